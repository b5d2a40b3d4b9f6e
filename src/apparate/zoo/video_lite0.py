"""`video-lite0`: EfficientNet-Lite0 (ImageNet weights) fine-tuned to answer a camera's question.

The three fixed-camera clips of `<data dir>/video/` (`video_labels.CLIPS`) are decoded at
160x160 (the model's input here; see docs/video.md for why not 224) and labelled per frame by
MOG2 background subtraction. Each clip is split in time:

- its first 10% of frames: the ramps' bootstrap (stream `bootstrap`), never served, never used
  for fine-tuning;
- the rest: served (streams `camera-day`, the clips one after another, and one per clip), and
  cut into 2-second blocks, alternately used for fine-tuning and held back, so that the
  fine-tuned model's label accuracy is measured on frames it never saw (`held_back_accuracy`).

Fine-tuning keeps the stem and MBConv blocks 0-2 frozen at their ImageNet weights (their
activations are computed once and cached in memory), and trains blocks 3-15, the head
convolution and a new 2-class classifier on top, batch norms in inference mode, on every
second frame of the fine-tuning blocks (neighbouring frames are near-duplicates). Training the
deep blocks alone (blocks 0-10 frozen) left the ramps at sites 0-10 on ImageNet features that
agree with the camera model's answer on 48-78% of frames (docs/video.md). The result is
cached as safetensors under the cache directory with a JSON of its metrics, so it is made once.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from apparate import paths
from apparate.zoo.video import Clip, clips_stream, decode_clip
from apparate.zoo.video_labels import CLASS_NAMES, CLIPS, ClipSpec, LabelRecipe, clip_labels
from apparate.zoo.workload import Stream

PathLike = str | os.PathLike | None

FRAME_SIZE = (160, 160)
BOOTSTRAP_SHARE = 0.10
RECIPE_VERSION = 1


@dataclass(frozen=True)
class FineTuneRecipe:
    """How the cached camera model is made; part of its cache key."""

    frozen_blocks: int = 3  # stem and blocks 0..2 keep ImageNet weights
    block_seconds: float = 2.0  # fine-tuning / held-back blocks alternate at this length
    frame_stride: int = 2  # every 2nd frame of a fine-tuning block (neighbours are near-duplicates)
    epochs: int = 12
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def key(self) -> str:
        return (f"v{RECIPE_VERSION}-f{self.frozen_blocks}-blk{self.block_seconds:g}-st{self.frame_stride}-e{self.epochs}"
                f"-b{self.batch_size}-lr{self.lr:g}-s{self.seed}")


@dataclass
class CameraClip:
    spec: ClipSpec
    clip: Clip  # frames at FRAME_SIZE
    labels: np.ndarray  # [N] aligned with clip.index (-1 where MOG2 saw no such frame)
    boot_end: int  # frames with index < boot_end are the bootstrap
    block: int  # frames per fine-tuning / held-back block

    def served(self) -> np.ndarray:
        return self.clip.index >= self.boot_end

    def _even_block(self) -> np.ndarray:
        return self.served() & (((self.clip.index - self.boot_end) // self.block) % 2 == 0)

    def fine_tune_mask(self, stride: int = 1) -> np.ndarray:
        return self._even_block() & ((self.clip.index - self.boot_end) % stride == 0)

    def held_back_mask(self) -> np.ndarray:
        """Frames of the other blocks: never seen by fine-tuning, nor next to a frame that was."""
        return self.served() & ~self._even_block()


def video_dir(data_dir: PathLike) -> Path:
    d = paths.data_dir(data_dir) / "video"
    missing = [c.file for c in CLIPS if not (d / c.file).exists()]
    if missing:
        raise FileNotFoundError(f"the camera clips {', '.join(missing)} are not in {d}")
    return d


@lru_cache(maxsize=1)
def _camera_clips(folder: str, recipe: LabelRecipe, block_seconds: float) -> tuple[CameraClip, ...]:
    out = []
    for spec in CLIPS:
        path = Path(folder) / spec.file
        clip = decode_clip(path, FRAME_SIZE)
        lab = clip_labels(path, spec, recipe)
        by_index = dict(zip(lab.index.tolist(), lab.labels.tolist()))
        labels = np.array([by_index.get(int(i), -1) for i in clip.index], dtype=np.int64)
        n = int(clip.index[-1]) + 1
        boot_end = int(math.ceil(BOOTSTRAP_SHARE * n))
        block = max(1, int(round(block_seconds * clip.info.fps)))
        out.append(CameraClip(spec, clip, labels, boot_end, block))
    return tuple(out)


def camera_clips(data_dir: PathLike = None, recipe: LabelRecipe = LabelRecipe(),
                 block_seconds: float = FineTuneRecipe().block_seconds) -> tuple[CameraClip, ...]:
    """The three clips decoded, labelled and split (kept in memory for the process: ~220 MB)."""
    return _camera_clips(str(video_dir(data_dir)), recipe, block_seconds)


def camera_stream(name: str, clips: Sequence[CameraClip], part: str, description: str, n: int | None = None) -> Stream:
    """Clips one after another: `part` is "served" (after each bootstrap) or "bootstrap"."""
    if part == "served":
        start, stop = [c.boot_end for c in clips], None
    elif part == "bootstrap":
        start, stop = None, [c.boot_end for c in clips]
    else:
        raise ValueError(f"part must be served or bootstrap, got {part!r}")
    s = clips_stream(name, [c.clip for c in clips], [c.labels for c in clips], description=description,
                     clip_names=[c.spec.name for c in clips], start=start, stop=stop)
    return s if n is None else s.take(slice(0, n))


# ------------------------------------------------------------------------------------ the model

def lite0_classifier(num_classes: int = 2, seed: int = 0) -> Any:
    """EfficientNet-Lite0 with its ImageNet weights and a fresh `num_classes` classifier."""
    import torch
    from torch import nn

    from apparate.zoo.effnet import load_effnet_lite0

    model = load_effnet_lite0()
    g = torch.Generator().manual_seed(seed)
    fc = nn.Linear(model._fc.in_features, num_classes)
    with torch.no_grad():
        fc.weight.normal_(0.0, 0.01, generator=g)
        fc.bias.zero_()
    model._fc = fc
    return model.eval()


def _trunk(model: Any, x: Any, upto: int) -> Any:
    """The frozen part: stem and blocks [0, upto)."""
    x = model._swish(model._bn0(model._conv_stem(x)))
    for block in model._blocks[:upto]:
        x = block(x, drop_connect_rate=0.0)
    return x


def _top(model: Any, x: Any, start: int) -> Any:
    """The trained part: blocks [start, end), head convolution, pooling, classifier."""
    for block in model._blocks[start:]:
        x = block(x, drop_connect_rate=0.0)
    x = model._swish(model._bn1(model._conv_head(x)))
    return model._fc(model._avg_pooling(x).flatten(1))


def _clip_hashes(clips: Sequence[CameraClip]) -> str:
    h = hashlib.sha256()
    for c in clips:
        st = c.clip.info.path.stat()
        h.update(f"{c.clip.info.path.name}|{st.st_size}|{c.spec}".encode())
    return h.hexdigest()[:12]


def fine_tuned_dir(data_dir: PathLike = None, recipe: FineTuneRecipe = FineTuneRecipe(),
                   labels: LabelRecipe = LabelRecipe(), progress: bool = True) -> Path:
    """The cached fine-tuned camera model, made on first use."""
    clips = camera_clips(data_dir, labels, recipe.block_seconds)
    target = paths.cache_dir("models") / f"video-lite0-{recipe.key()}-{labels.key()}-{_clip_hashes(clips)}"

    def make(tmp: Path) -> dict[str, Any]:
        info = fine_tune(tmp, clips, recipe, progress=progress)
        info["labelling"] = {"recipe": asdict(labels), "clips": [asdict(c.spec) for c in clips]}
        return info

    return paths.build_once(target, make)


def fine_tune(out_dir: Path, clips: Sequence[CameraClip], recipe: FineTuneRecipe, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the top of Lite0 on the fine-tuning blocks; save; return its metrics."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from apparate.zoo.effnet import Lite0Encoder

    torch.manual_seed(recipe.seed)
    model = lite0_classifier(2, recipe.seed)
    enc = Lite0Encoder(FRAME_SIZE)
    k = recipe.frozen_blocks
    t0 = time.perf_counter()
    # Frozen activations of the fine-tuning and held-back frames, once.
    feats, labels, train, clip_of = [], [], [], []
    use = [c.fine_tune_mask(recipe.frame_stride) | c.held_back_mask() for c in clips]
    total = sum(int(u.sum()) for u in use)
    with torch.no_grad(), tqdm(total=total, desc="camera model: frozen ImageNet features (once, cached)",
                               disable=None if progress else True, unit="frame") as bar:
        for ci, c in enumerate(clips):
            served = np.flatnonzero(use[ci])
            ft = c.fine_tune_mask(recipe.frame_stride)
            for s in range(0, len(served), 64):
                idx = served[s:s + 64]
                x = enc([torch.from_numpy(np.ascontiguousarray(c.clip.frames[i].transpose(2, 0, 1))) for i in idx])
                feats.append(_trunk(model, x, k).half())
                labels.append(c.labels[idx])
                train.append(ft[idx])
                clip_of.append(np.full(len(idx), ci))
                bar.update(len(idx))
    z = torch.cat(feats)
    y = torch.as_tensor(np.concatenate(labels))
    is_train = np.concatenate(train) & (y.numpy() >= 0)
    clip_of_a = np.concatenate(clip_of)
    held = ~np.concatenate(train) & (y.numpy() >= 0)
    cache_s = time.perf_counter() - t0

    for p in model.parameters():
        p.requires_grad_(False)
    top = [*model._blocks[k:], model._conv_head, model._bn1, model._fc]
    params = [p for m in top for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    tr = torch.as_tensor(np.flatnonzero(is_train))
    steps = recipe.epochs * math.ceil(len(tr) / recipe.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(recipe.seed)
    t1 = time.perf_counter()
    model.eval()  # batch norms keep their ImageNet statistics; no dropout
    bar = tqdm(range(recipe.epochs), desc="camera model: fine-tuning blocks "
               f"{k}-{len(model._blocks) - 1} + head (once, cached)", disable=None if progress else True, unit="epoch")
    for _ in bar:
        order = tr[torch.randperm(len(tr), generator=gen)]
        run = 0.0
        for s in range(0, len(order), recipe.batch_size):
            idx = order[s:s + recipe.batch_size]
            loss = F.cross_entropy(_top(model, z[idx].float(), k), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            run += float(loss.detach()) * len(idx)
        bar.set_postfix(loss=f"{run / len(tr):.3f}")
    train_s = time.perf_counter() - t1
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        pred = torch.cat([_top(model, z[s:s + 256].float(), k).argmax(-1) for s in range(0, len(z), 256)]).numpy()
    yn = y.numpy()

    def acc(mask: np.ndarray) -> float | None:
        return round(float((pred[mask] == yn[mask]).mean()), 4) if mask.any() else None

    per_clip = []
    for ci, c in enumerate(clips):
        m = clip_of_a == ci
        per_clip.append({
            "clip": c.spec.name, "file": c.spec.file, "question": c.spec.question, "frames": int(len(c.clip)),
            "bootstrap_frames": int((~c.served()).sum()), "served_frames": int(c.served().sum()),
            "fine_tune_frames": int((m & is_train).sum()), "held_back_frames": int((m & held).sum()),
            "positive_share_served": round(float(c.labels[c.served()].mean()), 4),
            "positive_share_all": round(float((c.labels == 1).mean()), 4),
            "held_back_accuracy": acc(m & held), "fine_tune_accuracy": acc(m & is_train),
        })
    state = {k_: v.detach().contiguous() for k_, v in model.state_dict().items()}
    save_file(state, str(out_dir / "model.safetensors"))
    return {
        "recipe": asdict(recipe), "frame_size": list(FRAME_SIZE), "classes": list(CLASS_NAMES),
        "held_back_accuracy": acc(held), "fine_tune_accuracy": acc(is_train),
        "positive_share_served": round(float(np.concatenate([c.labels[c.served()] for c in clips]).mean()), 4),
        "fine_tune_frames": int(is_train.sum()), "held_back_frames": int(held.sum()),
        "cache_seconds": round(cache_s, 1), "train_seconds": round(train_s, 1), "steps": steps,
        "torch_threads": torch.get_num_threads(), "clips": per_clip,
    }


def load_camera_model(model_dir: Path) -> Any:
    """The fine-tuned model from its cache folder (safetensors), in eval mode."""
    from safetensors.torch import load_file

    model = lite0_classifier(2)
    model.load_state_dict(load_file(str(Path(model_dir) / "model.safetensors")), strict=True)
    return model.eval()


def fine_tune_info(model_dir: Path) -> dict[str, Any]:
    return json.loads((Path(model_dir) / "apparate.json").read_text())


# ------------------------------------------------------------------------------------ the workload

def video_workload(data_dir: PathLike = None, progress: bool = True) -> Any:
    from apparate.zoo.workload import Workload
    from apparate.zoo.effnet import Lite0Encoder

    model_dir = fine_tuned_dir(data_dir, progress=progress)
    model = load_camera_model(model_dir)
    info = fine_tune_info(model_dir)
    clips = camera_clips(data_dir)
    names = [c.spec.name for c in clips]

    def make(part: str, which: Sequence[int], name: str, what: str):
        def factory(seed: int = 0, n: int | None = None) -> Stream:  # seed: the footage has one order
            return camera_stream(name, [clips[i] for i in which], part, what, n=n)
        return factory

    everything = range(len(clips))
    streams = {
        "camera-day": make("served", everything, "camera-day",
                           f"camera day: {', '.join(names)} one after another, each after its first "
                           f"{BOOTSTRAP_SHARE:.0%} (the bootstrap), at each clip's own frame rate"),
        "bootstrap": make("bootstrap", everything, "bootstrap",
                          f"the first {BOOTSTRAP_SHARE:.0%} of each clip (ramp training only, never served)"),
    }
    for i, c in enumerate(clips):
        streams[c.spec.name] = make("served", [i], c.spec.name,
                                    f"{c.spec.file} after its first {BOOTSTRAP_SHARE:.0%}: {c.spec.question}")
    return Workload(
        name="video-lite0", kind="image", model=model, encode=Lite0Encoder(FRAME_SIZE), num_classes=2,
        class_names=CLASS_NAMES, streams=streams, bootstrap_stream="bootstrap", default_ramp="pool",
        frame_size=FRAME_SIZE, source={"kind": "zoo", "workload": "video-lite0", "fine_tune": info["recipe"]},
        description="EfficientNet-Lite0 (ImageNet weights) fine-tuned on three fixed cameras: is there a vehicle "
                    "in the region of interest? (labels: MOG2 background subtraction)",
        info={k: info[k] for k in ("held_back_accuracy", "fine_tune_accuracy", "positive_share_served", "train_seconds", "cache_seconds")})
