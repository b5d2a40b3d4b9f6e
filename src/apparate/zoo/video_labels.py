"""Per-frame labels for the fixed-camera clips: is there a vehicle in the clip's region of interest?

The question is one a user would ask of such a camera ("a car in the car-park lane", "a vehicle
in the near lanes"), answered per frame by OpenCV's MOG2 background subtraction, not by a
hand-written detector:

1. MOG2 learns the clip's background (frames at most 320 pixels wide) over one pass of all its frames (the camera is fixed, so
   each pixel is road most of the time), then a second pass with learning off marks each
   frame's foreground; shadow pixels (MOG2's grey, 127) are not foreground.
2. A morphological opening removes speckle, a closing joins the pieces of one vehicle.
3. The frame is positive when a connected foreground blob inside the region of interest covers
   at least `min_blob` of the frame: vehicle-sized, so the cyclist and far-away cars do not count.

Regions and blob sizes are per clip (`CLIPS`), chosen so that neither answer is rare over the
whole camera day. The labels only train the served model (and are reported beside its answers);
Apparate's accuracy is agreement with that model, never with these labels.

Labels are cached under the cache directory, keyed by the clip's bytes and the recipe.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from apparate import paths
from apparate.zoo.video import iter_frames, probe

PathLike = str | os.PathLike

LABELS_VERSION = 1
CLASS_NAMES = ("no vehicle in region", "vehicle in region")


@dataclass(frozen=True)
class ClipSpec:
    file: str  # under <data dir>/video/
    name: str  # stream name
    question: str
    roi: tuple[float, float, float, float]  # x0, y0, x1, y1 as shares of the frame
    min_blob: float  # smallest blob that counts, as a share of the frame's area


CLIPS = (
    ClipSpec("car-detection.mp4", "car-park", "a car in the car-park lane (the whole view)",
             (0.0, 0.0, 1.0, 1.0), 0.005),
    ClipSpec("highway-cyclist.avi", "motorway", "a vehicle in the near lanes (the lower 40% of the view, "
             "right of the central reservation)", (0.15, 0.6, 0.95, 1.0), 0.005),
    ClipSpec("highway.avi", "highway", "a vehicle in the near part of the road (the lower 40% of the view, "
             "left of the verge)", (0.0, 0.6, 0.85, 1.0), 0.005),
)


@dataclass(frozen=True)
class LabelRecipe:
    max_width: int = 320  # frames are labelled at most this wide (aspect kept): blobs are shares of the frame
    history: int = 500  # MOG2 frames of history
    var_threshold: float = 16.0  # MOG2's default
    open_px: int = 5  # opening kernel (speckle)
    close_px: int = 9  # closing kernel (joins a vehicle's pieces)

    def key(self) -> str:
        return f"v{LABELS_VERSION}-w{self.max_width}-h{self.history}-t{self.var_threshold:g}-o{self.open_px}-c{self.close_px}"


@dataclass
class ClipLabels:
    labels: np.ndarray  # [N] 0/1 per decoded frame, camera order
    blob: np.ndarray  # [N] largest in-region blob as a share of the frame
    index: np.ndarray  # [N] frame index (as decoded by `iter_frames`)


def foreground_masks(path: PathLike, recipe: LabelRecipe = LabelRecipe()) -> tuple[np.ndarray, list[np.ndarray]]:
    """(frame indices, cleaned MOG2 foreground masks) of a clip: two passes, learn then apply."""
    import cv2

    info = probe(path)
    size = None
    if info.width > recipe.max_width:
        size = (int(round(info.height * recipe.max_width / info.width)), recipe.max_width)
    cv2.setRNGSeed(0)
    mog = cv2.createBackgroundSubtractorMOG2(history=recipe.history, varThreshold=recipe.var_threshold,
                                             detectShadows=True)
    for _, img in iter_frames(path, size, fmt="bgr24", warn=lambda _m: None):
        mog.apply(img)
    k_open = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (recipe.open_px, recipe.open_px))
    k_close = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (recipe.close_px, recipe.close_px))
    idx, masks = [], []
    for i, img in iter_frames(path, size, fmt="bgr24", warn=lambda _m: None):
        m = mog.apply(img, learningRate=0)
        m = np.where(m == 255, 255, 0).astype(np.uint8)  # 127 = shadow
        m = cv2.morphologyEx(m, cv2.MORPH_OPEN, k_open)
        m = cv2.morphologyEx(m, cv2.MORPH_CLOSE, k_close)
        idx.append(i)
        masks.append(m)
    return np.asarray(idx, dtype=np.int64), masks


def region_slices(shape: tuple[int, int], roi: tuple[float, float, float, float]) -> tuple[slice, slice]:
    h, w = shape
    x0, y0, x1, y1 = roi
    return slice(int(round(y0 * h)), int(round(y1 * h))), slice(int(round(x0 * w)), int(round(x1 * w)))


def largest_blob(mask: np.ndarray, roi: tuple[float, float, float, float]) -> float:
    """Area of the largest connected foreground blob inside `roi`, as a share of the frame."""
    import cv2

    ys, xs = region_slices(mask.shape[:2], roi)
    sub = np.ascontiguousarray(mask[ys, xs])
    n, _, stats, _ = cv2.connectedComponentsWithStats(sub, connectivity=8)
    if n <= 1:
        return 0.0
    return float(stats[1:, cv2.CC_STAT_AREA].max()) / float(mask.shape[0] * mask.shape[1])


def label_clip(path: PathLike, spec: ClipSpec, recipe: LabelRecipe = LabelRecipe()) -> ClipLabels:
    idx, masks = foreground_masks(path, recipe)
    blob = np.array([largest_blob(m, spec.roi) for m in masks])
    return ClipLabels((blob >= spec.min_blob).astype(np.int64), blob, idx)


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def clip_labels(path: PathLike, spec: ClipSpec, recipe: LabelRecipe = LabelRecipe()) -> ClipLabels:
    """`label_clip`, cached under the cache directory (a few seconds per clip the first time)."""
    p = Path(path)
    roi = "-".join(f"{v:g}" for v in spec.roi)
    target = paths.cache_dir("video", "labels") / f"{p.stem}-{_file_hash(p)}-{recipe.key()}-r{roi}-b{spec.min_blob:g}.npz"
    if target.exists():
        with np.load(target, allow_pickle=False) as z:
            return ClipLabels(z["labels"], z["blob"], z["index"])
    out = label_clip(p, spec, recipe)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, labels=out.labels, blob=out.blob, index=out.index)
    os.replace(tmp, target)
    return out


def recipe_dict(recipe: LabelRecipe = LabelRecipe()) -> dict:
    return {"recipe": asdict(recipe), "clips": [asdict(c) for c in CLIPS]}
