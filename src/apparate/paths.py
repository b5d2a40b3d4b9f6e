"""Where data and caches live.

Data (weights, images, texts, traces) comes from a data directory, never from a hub: the
`--data-dir` flag, else `APPARATE_DATA`, else `../shared/data` or `./data` if one exists.
Expensive derived artefacts (fine-tuned models, extracted images) are cached under
`APPARATE_CACHE`, else `~/.cache/apparate`.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_dir(explicit: str | os.PathLike | None = None, required: bool = True) -> Path | None:
    """The data directory, or a clear error naming the ways to set it."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get("APPARATE_DATA"):
        candidates.append(Path(os.environ["APPARATE_DATA"]))
    else:
        candidates += [Path("../shared/data"), Path("data")]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    if required:
        tried = ", ".join(str(c) for c in candidates)
        raise FileNotFoundError(
            f"no data directory (tried {tried}); pass --data-dir DIR or set APPARATE_DATA")
    return None


def cache_dir(*parts: str) -> Path:
    """A cache subdirectory, created on demand."""
    root = Path(os.environ.get("APPARATE_CACHE") or Path.home() / ".cache" / "apparate")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
