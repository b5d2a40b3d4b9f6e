"""Bring your own: an image folder or manifest, a CSV/TSV of texts, any torch image classifier,
any Hugging Face sequence-classification model directory.

- Image folder: `root/<class>/*.{jpg,png,...}` (classes sorted by name give the label indices)
  or a flat folder (labels unknown). Manifest: a CSV with a `path` column (relative to the
  manifest) and optionally `label`.
- Texts: a CSV/TSV with a header, a text column and optionally an integer `label` column.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from apparate.zoo.workload import Stream, Workload

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def _decode(path: Path, size: tuple[int, int] | None) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def image_stream(source: str | os.PathLike, size: tuple[int, int] | None = None, name: str = "images",
                 limit: int | None = None) -> tuple[Stream, tuple[str, ...]]:
    """(stream, class names) from an image folder or a CSV manifest. Without `size`, every image
    must have the first image's size."""
    src = Path(source)
    entries: list[tuple[Path, int]] = []
    classes: tuple[str, ...] = ()
    if src.is_file():
        with src.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "path" not in rows[0]:
            raise ValueError(f"{src}: an image manifest needs a header with a `path` column")
        for r in rows:
            lab = r.get("label", "")
            entries.append((src.parent / r["path"], int(lab) if str(lab).strip() else -1))
    elif src.is_dir():
        subdirs = sorted(d for d in src.iterdir() if d.is_dir())
        if subdirs:
            classes = tuple(d.name for d in subdirs)
            for ci, d in enumerate(subdirs):
                entries += [(p, ci) for p in sorted(d.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
        else:
            entries = [(p, -1) for p in sorted(src.iterdir()) if p.suffix.lower() in IMAGE_EXTS]
    else:
        raise FileNotFoundError(f"no image folder or manifest at {src}")
    if not entries:
        raise ValueError(f"{src} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    if limit:
        entries = entries[:limit]
    images = []
    for p, _ in entries:
        if not p.exists():
            raise FileNotFoundError(f"image {p} listed in {src} does not exist")
        img = _decode(p, size)
        if images and img.shape != images[0].shape:
            raise ValueError(f"{p} is {img.shape[1]}x{img.shape[0]} but earlier images are "
                             f"{images[0].shape[1]}x{images[0].shape[0]}: pass size=(H, W) to resize")
        images.append(img)
    stream = Stream(name, np.stack(images), np.array([lab for _, lab in entries]), np.ones(len(entries)),
                    f"images from {src}", {"paths": [str(p) for p, _ in entries]})
    return stream, classes


class ImageEncoder:
    """uint8 images -> float tensors scaled to 0..1 and normalised by mean/std."""

    def __init__(self, mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)) -> None:
        self.mean = torch.tensor(list(mean)).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std)).view(1, -1, 1, 1)

    def __call__(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        return (torch.stack(list(images)).float() / 255.0 - self.mean) / self.std


def image_workload(model: nn.Module, images: str | os.PathLike | Stream, num_classes: int, name: str = "custom-images",
                   mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                   size: tuple[int, int] | None = None, site_names: list[str] | None = None,
                   class_names: Sequence[str] = ()) -> Workload:
    """A workload from any torch image classifier and an image folder/manifest (or a Stream)."""
    if isinstance(images, Stream):
        stream, classes = images, tuple(class_names)
    else:
        stream, classes = image_stream(images, size)
        classes = tuple(class_names) or classes

    def make(seed: int = 0, n: int | None = None) -> Stream:
        return stream.take(slice(0, n or len(stream)))

    return Workload(name=name, kind="image", model=model.eval(), encode=ImageEncoder(mean, std),
                    num_classes=num_classes, class_names=classes or tuple(str(i) for i in range(num_classes)),
                    streams={"images": make}, bootstrap_stream="images", default_ramp="pool",
                    site_names=site_names, source={"kind": "module"}, description=f"{type(model).__name__} on {name}")


def text_file_stream(path: str | os.PathLike, encoder: Any, text_column: str | None = None,
                     label_column: str | None = "label", name: str = "texts") -> Stream:
    from apparate.zoo.text import read_table

    rows = read_table(path, text_column, label_column)
    texts = [r.text for r in rows]
    return Stream(name, texts, np.array([r.label for r in rows]), encoder.lengths(texts), f"texts from {path}")


def hf_text_workload(model_dir: str | os.PathLike, texts: str | os.PathLike | None, text_column: str | None = None,
                     label_column: str | None = "label", max_length: int = 128) -> Workload:
    """A workload from any HF sequence-classification model directory and a CSV/TSV of texts."""
    from apparate.zoo import minilm
    from apparate.zoo.text_workloads import TextEncoder, text_workload

    model_dir = Path(model_dir).resolve()
    hf = minilm.load_hf_classifier(model_dir)
    tok = minilm.load_tokenizer(model_dir)
    enc = TextEncoder(tok, max_length)
    streams = {}
    if texts is not None:
        base = text_file_stream(texts, enc, text_column, label_column)

        def make(seed: int = 0, n: int | None = None) -> Stream:
            return base.take(slice(0, n or len(base)))
        streams["texts"] = make
    labels = getattr(hf.config, "id2label", None) or {}
    n = int(getattr(hf.config, "num_labels", len(labels) or 2))
    names = tuple(str(labels.get(i, i)) for i in range(n))
    return text_workload(f"hf:{model_dir.name}", hf, tok, streams, "texts", names,
                         {"kind": "hf", "path": str(model_dir)}, enc, description=f"HF classifier at {model_dir}")
