"""Streams by name for every command that takes `--stream`: a workload's named streams, or your
own inputs, each read by its own module:

    video:PATH    footage (a video file, or a folder of them in name order)  `zoo.video`
    images:PATH   an image folder (class subfolders or flat) or a CSV manifest  `zoo.image_files`
    csv:PATH      texts: a CSV/TSV with a text column, optionally `label`  `zoo.text.read_table`

Images are resized to the workload's frame size; a folder's class subfolders and a manifest's
label names are matched to the workload's own classes (so that ground-truth accuracy means what
it says). Labels are optional everywhere (-1: unknown). `check_stream` reads and checks every
row or file before any model work, so a malformed line fails at once, naming the line.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

from apparate.zoo import video
from apparate.zoo.workload import Stream

PREFIXES = {"video:": "image", "images:": "image", "csv:": "text"}
Warn = Callable[[str], None]


def own_prefix(name: str | None) -> str | None:
    """The prefix of one of your own streams (`video:`, `images:`, `csv:`), else None."""
    return next((p for p in PREFIXES if name and str(name).startswith(p)), None)


def is_own_stream(name: str | None) -> bool:
    return own_prefix(name) is not None


def _path(name: str) -> Path:
    prefix = own_prefix(name)
    path = str(name)[len(prefix):] if prefix else ""
    if not path:
        raise ValueError(f"stream {name!r} names no file: write {prefix}PATH")
    return Path(path)


def check_stream(name: str | None, kind: str | None = None) -> None:
    """Raise before any work if `name` is one of your own streams and cannot be read, or does not
    suit a workload of `kind` ('image' or 'text'; None: not checked)."""
    prefix = own_prefix(name)
    if prefix is None:
        return
    if kind is not None and PREFIXES[prefix] != kind:
        raise ValueError(f"{prefix}PATH streams need a{'n' if PREFIXES[prefix] == 'image' else ''} "
                         f"{PREFIXES[prefix]} workload; this one takes {kind}"
                         + ("; use csv:PATH" if kind == "text" else "; use images:PATH or video:PATH"))
    path = _path(str(name))
    if prefix == "video:":
        video.probe_all(path)
    elif prefix == "images:":
        from apparate.zoo.image_files import image_entries

        image_entries(path, None)
    else:
        from apparate.zoo.text import read_table

        read_table(path)


def stream_key(name: str, fps: float | None = None) -> str:
    """A file-name-safe cache key for a stream: its name, or for your own stream a hash of its
    files (path, size, modification time) that changes when any of them does."""
    prefix = own_prefix(name)
    if prefix is None:
        return name
    if prefix == "video:":
        return video.footage_key(name, fps)
    path = _path(name)
    files = [path]
    if prefix == "images:":
        from apparate.zoo.image_files import image_entries

        files += [p for p, _ in image_entries(path, None, warn=lambda _: None)[0]]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in path.stem)[:40]
    return f"{prefix[:-1]}-{stem}-{h.hexdigest()[:12]}"


def resolve_stream(workload: Any, name: str, seed: int = 0, n: int | None = None, fps: float | None = None,
                   warn: Warn = video._stderr) -> Stream:
    """A workload's named stream, or your own (`video:`, `images:`, `csv:`) read for it."""
    prefix = own_prefix(name)
    if prefix is None:
        return workload.stream(name, seed=seed, **({"n": n} if n else {}))
    check_stream(name, workload.kind)
    path = _path(name)
    if prefix == "video:":
        return video.footage_stream(path, video.frame_size(workload), fps=fps, n=n, warn=warn)
    if prefix == "images:":
        from apparate.zoo.image_files import image_stream

        stream, _ = image_stream(path, video.frame_size(workload), name=f"images:{path.name}", limit=n,
                                 class_names=tuple(workload.class_names), warn=warn)
        return stream
    from apparate.zoo.byo import text_file_stream

    stream = text_file_stream(path, workload.encode, name=f"csv:{path.name}")
    bad = [i for i, lab in enumerate(stream.labels) if lab >= workload.num_classes]
    if bad:
        raise ValueError(f"{path}: label {stream.labels[bad[0]]} of text {bad[0] + 1} is outside the model's "
                         f"0..{workload.num_classes - 1} ({', '.join(workload.class_names)})")
    return stream.take(slice(0, n)) if n else stream
