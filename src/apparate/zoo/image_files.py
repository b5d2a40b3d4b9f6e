"""Your own images as a stream: a folder of class subfolders, a flat folder, or a CSV manifest.

- Folder: `root/<class>/*.{jpg,png,...}` (classes sorted by name give the label indices; given
  the model's `class_names`, each subfolder is matched to one by name or index, and where none
  matches the labels are unknown) or a flat folder (labels unknown).
- Manifest: a CSV with a header holding a `path` column (relative to the manifest) and optionally
  `label` (an integer, or a class name when `class_names` is given; empty means unknown).

A malformed manifest row (a missing path, a label that is not a class, a wrong number of cells)
or an image that cannot be read is a `ValueError` naming the file and line, raised before any
model work: a silently skipped row would be a different stream.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from apparate.zoo.workload import Stream

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}
PathLike = str | os.PathLike


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e})") from None


def _label(value: str, class_names: Sequence[str] | None, where: str) -> int:
    """A manifest label: an index, or a class name; `class_names` None (a check before the model's
    classes are known) takes any name, as -1."""
    v = value.strip()
    if not v:
        return -1
    if class_names is None:
        try:
            lab = int(v)
        except ValueError:
            return -1  # a class name: checked once the model's classes are known
        if lab < 0:
            raise ValueError(f"{where}: label {lab} is negative")
        return lab
    lower = [c.lower() for c in class_names]
    if v.lower() in lower:
        return lower.index(v.lower())
    try:
        lab = int(v)
    except ValueError:
        known = f" or one of {', '.join(class_names)}" if class_names else ""
        raise ValueError(f"{where}: label {value!r} is not an integer{known}") from None
    if lab < 0 or (class_names and lab >= len(class_names)):
        raise ValueError(f"{where}: label {lab} is outside 0..{len(class_names) - 1}")
    return lab


def manifest_entries(path: Path, class_names: Sequence[str] | None = ()) -> list[tuple[Path, int]]:
    """(image path, label) per row of a CSV manifest, checked row by row."""
    entries = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        try:
            header = [c.strip() for c in next(reader, [])]
            if "path" not in header:
                raise ValueError(f"{path}, line 1: an image manifest needs a header with a `path` column, "
                                 f"got {','.join(header) or 'nothing'}")
            col, lab = header.index("path"), header.index("label") if "label" in header else None
            for row in reader:
                where = f"{path}, line {reader.line_num}"
                if not any(c.strip() for c in row):
                    continue
                if len(row) != len(header):
                    raise ValueError(f"{where}: {len(row)} cells, the header has {len(header)}")
                if not row[col].strip():
                    raise ValueError(f"{where}: empty path")
                label = -1 if lab is None else _label(row[lab], class_names, where)
                entries.append((path.parent / row[col].strip(), label))
        except csv.Error as e:
            raise ValueError(f"{path}, line {reader.line_num}: {e}") from None
    return entries


def folder_entries(root: Path, class_names: Sequence[str] | None = (), warn: Callable[[str], None] = print) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """(image path, label) per image of a folder and the class names its subfolders give."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir())
    if not subdirs:
        return [(p, -1) for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_EXTS], ()
    names = tuple(d.name for d in subdirs)
    if class_names:  # the model's own classes: subfolders are matched to them by name or index
        index = {c.lower(): i for i, c in enumerate(class_names)}
        found = [index.get(d.name.lower(), int(d.name) if d.name.isdigit() and int(d.name) < len(class_names)
                           else None) for d in subdirs]
        unmatched = [d.name for d, i in zip(subdirs, found) if i is None]
        if unmatched and len(unmatched) < len(subdirs):  # some match: the others are likely typos
            raise ValueError(f"{root}: folder(s) {', '.join(unmatched)} are not among the model's classes "
                             f"({', '.join(class_names[:12])}{', ...' if len(class_names) > 12 else ''}) "
                             "nor class indices")
        if unmatched:  # none match: the folders are the user's own grouping, not the model's labels
            warn(f"{root}: no subfolder names one of the model's classes; ground-truth labels unknown")
            found = [-1] * len(subdirs)
        labels, names = found, tuple(class_names)
    else:
        labels = list(range(len(subdirs)))
    entries = [(p, lab) for d, lab in zip(subdirs, labels) for p in sorted(d.iterdir())
               if p.suffix.lower() in IMAGE_EXTS]
    return entries, names


def image_entries(source: PathLike, class_names: Sequence[str] | None = (),
                  warn: Callable[[str], None] = print) -> tuple[list[tuple[Path, int]], tuple[str, ...]]:
    """Every (image path, label) of a folder or manifest, checked (files exist) before decoding.
    `class_names` None: the model's classes are not known yet (a check before loading it)."""
    src = Path(source)
    if src.is_file():
        entries, classes = manifest_entries(src, class_names), tuple(class_names or ())
    elif src.is_dir():
        entries, classes = folder_entries(src, class_names, warn)
    else:
        raise FileNotFoundError(f"no image folder or manifest at {src}")
    if not entries:
        raise ValueError(f"{src} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    for p, _ in entries:
        if not p.exists():
            raise FileNotFoundError(f"image {p} listed in {src} does not exist")
    return entries, classes


def image_stream(source: PathLike, size: tuple[int, int] | None = None, name: str = "images",
                 limit: int | None = None, class_names: Sequence[str] = (),
                 warn: Callable[[str], None] = print) -> tuple[Stream, tuple[str, ...]]:
    """(stream, class names) from an image folder or a CSV manifest. Without `size`, every image
    must have the first image's size."""
    entries, classes = image_entries(source, class_names, warn)
    if limit:
        entries = entries[:limit]
    images = []
    for p, _ in entries:
        img = _decode(p, size)
        if images and img.shape != images[0].shape:
            raise ValueError(f"{p} is {img.shape[1]}x{img.shape[0]} but earlier images are "
                             f"{images[0].shape[1]}x{images[0].shape[0]}: pass size=(H, W) to resize")
        images.append(img)
    stream = Stream(name, np.stack(images), np.array([lab for _, lab in entries]), np.ones(len(entries)),
                    f"images from {source}", {"paths": [str(p) for p, _ in entries]})
    return stream, classes
