"""Video footage as streams: frames in camera order, with their timestamps.

Decoding is PyAV's (FFmpeg inside the wheel), never by hand. Frames come out RGB, resized (with
FFmpeg's area filter) to the size the workload's model takes, so that a long clip costs what its
model inputs cost and not what its native frames do. Each frame's timestamp is its index over
the clip's own frame rate (or over a given `fps`): the arrival time of a camera that sends every
frame. Container timestamps are not used, because AVI files carry none for B-frames and
placeholder packets (the motorway clip's first frames have "pts" 1, 4, 6, 5).

A frame whose data fails to decode (FFmpeg is asked to report damage, `err_detect=explode`,
instead of hiding it) is reported with its index through `warn` and skipped; the stream goes on.
A file that cannot be opened, or holds no video, is a `VideoError` from `probe`, which callers
run on every file before any other work.

    video:PATH       a video file, or a folder of them played in name order (one clip each)
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from apparate.zoo.workload import Stream

PathLike = str | os.PathLike
Warn = Callable[[str], None]

PREFIX = "video:"
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".wmv", ".flv"}


class VideoError(ValueError):
    """A video that cannot be used: missing, unreadable, or without a video track."""


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    fps: float
    frames: int  # as the container states it (0 where it does not say)
    width: int
    height: int
    codec: str


@dataclass
class Clip:
    """One decoded video: frames [N, H, W, 3] RGB uint8 in camera order."""

    info: VideoInfo
    frames: np.ndarray
    index: np.ndarray  # [N] frame index within the clip (bad frames leave gaps)
    bad_frames: list[int] = field(default_factory=list)  # indices that failed to decode

    def __len__(self) -> int:
        return len(self.frames)


def is_video_stream(name: str | None) -> bool:
    return bool(name) and str(name).startswith(PREFIX)


def video_files(path: PathLike) -> list[Path]:
    """A video file, or the video files of a folder in name order."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_EXTS)
        if not files:
            raise VideoError(f"folder {p} holds no video files ({', '.join(sorted(VIDEO_EXTS))})")
        return files
    if not p.exists():
        raise VideoError(f"no video file or folder at {p}")
    return [p]


def probe(path: PathLike) -> VideoInfo:
    """Open a video and read its format, or raise a `VideoError` that says why not."""
    import av

    p = Path(path)
    try:
        with av.open(str(p)) as c:
            if not c.streams.video:
                raise VideoError(f"{p} holds no video track")
            vs = c.streams.video[0]
            rate = vs.average_rate or vs.guessed_rate or vs.base_rate
            fps = float(rate) if rate else 0.0
            w, h = vs.codec_context.width, vs.codec_context.height
            codec = vs.codec_context.name
            frames = int(vs.frames or 0)
    except VideoError:
        raise
    except (av.error.FFmpegError, OSError) as e:
        raise VideoError(f"cannot read video {p}: {e}") from None
    if fps <= 0 or w <= 0 or h <= 0:
        raise VideoError(f"cannot read video {p}: no frame rate or frame size in it")
    return VideoInfo(p, fps, frames, w, h, codec)


def probe_all(path: PathLike) -> list[VideoInfo]:
    """Every clip of `video:PATH`'s PATH, checked before any work (first bad one raises)."""
    return [probe(f) for f in video_files(path)]


def iter_frames(path: PathLike, size: tuple[int, int] | None = None, fmt: str = "rgb24",
                warn: Warn = _stderr, bad: list[int] | None = None,
                limit: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frame) in camera order; frames resized to `size` = (H, W) when given.

    A packet FFmpeg cannot decode is reported as the frame at the index it would have had, put
    in `bad`, and skipped.
    """
    import av

    p = Path(path)
    try:
        container = av.open(str(p))
    except (av.error.FFmpegError, OSError) as e:
        raise VideoError(f"cannot read video {p}: {e}") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"{p} holds no video track")
        vs = container.streams.video[0]
        vs.codec_context.options = {"err_detect": "explode"}  # report damage instead of concealing it
        kw: dict[str, Any] = {"format": fmt}
        if size is not None:
            kw.update(height=int(size[0]), width=int(size[1]), interpolation="AREA")
        index = 0

        def frames_of(packet: Any) -> Iterator[np.ndarray]:
            nonlocal index
            try:
                decoded = packet.decode()
            except av.error.FFmpegError as e:
                if packet.size:  # a flush packet at the end has nothing to lose
                    warn(f"video {p.name}: frame {index} failed to decode ({type(e).__name__}: "
                         f"{getattr(e, 'strerror', None) or e}); skipped")
                    if bad is not None:
                        bad.append(index)
                    index += 1
                return
            for fr in decoded:
                yield fr.to_ndarray(**kw)

        for packet in container.demux(vs):
            for img in frames_of(packet):
                yield index, img
                index += 1
                if limit is not None and index >= limit:
                    return


def decode_clip(path: PathLike, size: tuple[int, int] | None = None, warn: Warn = _stderr,
                limit: int | None = None) -> Clip:
    """Decode a whole clip (or its first `limit` frames) into memory."""
    info = probe(path)
    bad: list[int] = []
    idx, frames = [], []
    for i, img in iter_frames(path, size, warn=warn, bad=bad, limit=limit):
        idx.append(i)
        frames.append(img)
    if not frames:
        raise VideoError(f"no frame of {path} could be decoded")
    return Clip(info, np.stack(frames), np.asarray(idx, dtype=np.int64), bad)


def clips_stream(name: str, clips: Sequence[Clip], labels: Sequence[np.ndarray] | None = None,
                 fps: float | None = None, description: str = "", clip_names: Sequence[str] | None = None,
                 start: Sequence[int] | None = None, stop: Sequence[int | None] | None = None) -> Stream:
    """Clips one after another as one stream (a camera switch is an abrupt drift).

    `start`/`stop` cut each clip to frames [start, stop) of its own index. Timestamps run on
    across clips: each clip's frames at its own rate (or `fps`), the next clip one frame period
    after the last frame of the one before. `meta`: timestamp (s), clip (phase), frame index.
    """
    frames, labs, ts, clip_of, frame_of = [], [], [], [], []
    t0 = 0.0
    bad: list[str] = []
    for k, c in enumerate(clips):
        rate = fps or c.info.fps
        lo = 0 if start is None else start[k]
        hi = None if stop is None else stop[k]
        keep = (c.index >= lo) & (c.index < (np.iinfo(np.int64).max if hi is None else hi))
        idx = c.index[keep]
        if idx.size == 0:
            continue
        local = idx - idx[0]
        frames.append(c.frames[keep])
        labs.append(np.full(idx.size, -1) if labels is None else np.asarray(labels[k])[keep])
        ts.append(t0 + local / rate)
        t0 = float(ts[-1][-1]) + 1.0 / rate
        clip_of.append(np.full(idx.size, k))
        frame_of.append(idx)
        bad += [f"{c.info.path.name}:{i}" for i in c.bad_frames if i >= lo and (hi is None or i < hi)]
    if not frames:
        raise VideoError(f"stream {name!r} has no frames")
    names = list(clip_names or [c.info.path.stem for c in clips])
    rates = sorted({round(fps or c.info.fps, 3) for c in clips})
    meta: dict[str, Any] = {
        "timestamp": np.concatenate(ts), "phase": np.concatenate(clip_of), "frame": np.concatenate(frame_of),
        "phases": names, "fps": rates[0] if len(rates) == 1 else rates, "bad_frames": bad,
        "files": [str(c.info.path) for c in clips],
    }
    n = sum(len(f) for f in frames)
    return Stream(name, np.concatenate(frames), np.concatenate(labs), np.ones(n, dtype=np.int64),
                  description, meta)


def footage_stream(path: PathLike, size: tuple[int, int], fps: float | None = None, n: int | None = None,
                   warn: Warn = _stderr) -> Stream:
    """`video:PATH`: your own footage (a file, or a folder of them in name order), unlabelled."""
    infos = probe_all(path)
    clips = []
    left = n
    for info in infos:
        if left is not None and left <= 0:
            break
        clip = decode_clip(info.path, size, warn=warn, limit=left)
        clips.append(clip)
        if left is not None:
            left -= len(clip)
    rate = f"{fps:g} fps" if fps else "each clip's own frame rate"
    return clips_stream(f"{PREFIX}{Path(path).name}", clips, fps=fps,
                        description=f"footage from {path} ({len(clips)} clip(s)) at {rate}")


def footage_key(name: str, fps: float | None = None) -> str:
    """A file-name-safe cache key for `video:PATH` that changes when any of its files does."""
    files = video_files(name[len(PREFIX):])
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(f"fps={fps}".encode())
    stem = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in Path(name[len(PREFIX):]).stem)[:40]
    return f"video-{stem}-{h.hexdigest()[:12]}"


def frame_size(workload: Any) -> tuple[int, int]:
    """(H, W) of the frames a workload's model takes: its own `frame_size`, else its bootstrap
    stream's first input."""
    size = getattr(workload, "frame_size", None)
    if size:
        return int(size[0]), int(size[1])
    x = np.asarray(workload.stream(workload.bootstrap_stream, n=1).inputs[0])
    return int(x.shape[0]), int(x.shape[1])


def check_stream(name: str | None) -> None:
    """Raise before any work if `name` is `video:PATH` and some file of it cannot be read."""
    if is_video_stream(name):
        probe_all(str(name)[len(PREFIX):])


def resolve_stream(workload: Any, name: str, seed: int = 0, n: int | None = None, fps: float | None = None,
                   warn: Warn = _stderr) -> Stream:
    """A workload's named stream, or `video:PATH` decoded at the workload's frame size."""
    if not is_video_stream(name):
        return workload.stream(name, seed=seed, **({"n": n} if n else {}))
    if workload.kind != "image":
        raise ValueError(f"video streams need an image workload; {workload.name} takes {workload.kind}")
    return footage_stream(name[len(PREFIX):], frame_size(workload), fps=fps, n=n, warn=warn)
