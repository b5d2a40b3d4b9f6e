"""Bring your own: an image folder or manifest, a CSV/TSV of texts, any torch image classifier,
any Hugging Face sequence-classification model directory.

- Image folder or manifest: `apparate.zoo.image_files`.
- Texts: a CSV/TSV with a header, a text column and optionally an integer `label` column
  (`apparate.zoo.text.read_table`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from apparate.zoo.image_files import image_stream
from apparate.zoo.workload import Stream, Workload

__all__ = ["ImageEncoder", "hf_text_workload", "image_stream", "image_workload", "text_file_stream"]


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
