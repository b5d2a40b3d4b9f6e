"""CIFAR-10 images from the data directory's JPEG tarball, decoded once with Pillow and cached.

The tarball holds `train/<class>/NNNN.jpg` and `test/<class>/NNNN.jpg`. Decoding 60,000 JPEGs
takes a while, so each split is decoded on first use into one uncompressed `.npz` under the
cache (keyed by the tarball's size and sha256 prefix) and memory-mapped afterwards.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apparate import paths

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
VEHICLES = ("airplane", "automobile", "ship", "truck")
# 10-class answer -> "is it a vehicle?" (1 = vehicle)
VEHICLE_MAP = tuple(int(c in VEHICLES) for c in CLASSES)
TARBALL = Path("cifar10") / "cifar10_jpg.tar.gz"


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # [N, 32, 32, 3] uint8, RGB
    labels: np.ndarray  # [N] int64 class index into CLASSES

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def _tar_key(tar: Path) -> str:
    h = hashlib.sha256()
    with tar.open("rb") as f:
        h.update(f.read(1 << 20))  # the first MiB and the size identify the file well enough
    return f"{tar.stat().st_size}-{h.hexdigest()[:12]}"


def load_split(data_dir: str | os.PathLike | None, split: str, progress: bool = True) -> ImageSet:
    """All images of `train` (50,000) or `test` (10,000), ordered by class then file number."""
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
    tar = paths.data_dir(data_dir) / TARBALL
    if not tar.exists():
        raise FileNotFoundError(f"CIFAR-10 tarball not found at {tar}")
    cache = paths.cache_dir("cifar10") / f"{split}-{_tar_key(tar)}.npz"
    if not cache.exists():
        _decode_split(tar, split, cache, progress)
    with np.load(cache, allow_pickle=False) as z:
        return ImageSet(z["images"], z["labels"])


def _decode_split(tar_path: Path, split: str, out: Path, progress: bool) -> None:
    from PIL import Image
    from tqdm.auto import tqdm

    found: list[tuple[int, int, np.ndarray]] = []
    total = 50000 if split == "train" else 10000
    with tarfile.open(tar_path, "r:gz") as tf, tqdm(total=total, desc=f"decoding CIFAR-10 {split} JPEGs (once)",
                                                     disable=None if progress else True, unit="img") as bar:
        for member in tf:
            parts = member.name.strip("./").split("/")
            if not member.isfile() or len(parts) != 3 or parts[0] != split or parts[1] not in CLASSES:
                continue
            data = tf.extractfile(member).read()  # type: ignore[union-attr]
            img = Image.open(io.BytesIO(data)).convert("RGB")
            if img.size != (32, 32):
                img = img.resize((32, 32), Image.BILINEAR)
            found.append((CLASSES.index(parts[1]), int(Path(parts[2]).stem), np.asarray(img, dtype=np.uint8)))
            bar.update(1)
    if not found:
        raise ValueError(f"{tar_path} holds no {split}/<class>/*.jpg images")
    found.sort(key=lambda t: (t[0], t[1]))
    images = np.stack([f[2] for f in found])
    labels = np.array([f[0] for f in found], dtype=np.int64)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, images=images, labels=labels)
    os.replace(tmp, out)
