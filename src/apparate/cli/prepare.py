"""`apparate prepare WORKLOAD --out DIR`: find sites, train ramps, profile, write a bundle.

WORKLOAD is a zoo name (`apparate prepare --list`), `hf:DIR` for a Hugging Face
sequence-classification model directory (with `--texts FILE.csv|tsv`), or `images` for your
own torch model (`--model package.module:factory --images DIR|MANIFEST --classes N`).
"""

from __future__ import annotations

import argparse
import time

from apparate.devices import add_device_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="prepare a model: ramp sites, trained ramps, latency profile -> bundle",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", nargs="?", help="zoo workload name, hf:DIR, or images")
    p.add_argument("--out", help="bundle directory to write")
    p.add_argument("--list", action="store_true", help="list the zoo workloads and exit")
    p.add_argument("--data-dir", help="data directory (default: $APPARATE_DATA, else ../shared/data)")
    p.add_argument("--bootstrap", type=int, help="bootstrap inputs (default: the workload's; 20000 CIFAR images, else 5000 images / 2000 texts)")
    p.add_argument("--ramp", choices=("pool", "grid", "conv", "cls", "mean", "deebert"),
                   help="ramp kind (default: pool for images, mean for text)")
    p.add_argument("--threads", type=int, help="torch threads for training and profiling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=64, help="largest batch size profiled (powers of two up to it)")
    p.add_argument("--epochs", type=int, help="ramp training epochs (default 30, conv 10)")
    p.add_argument("--lr", type=float, help="ramp learning rate")
    p.add_argument("--holdout", type=float, default=0.1, help="share of the bootstrap held out and recorded")
    p.add_argument("--confidence", default="max_softmax", choices=("max_softmax", "margin", "entropy"))
    p.add_argument("--sites", help="comma-separated module names to use as sites (skips discovery)")
    p.add_argument("--repeats", type=int, default=7, help="profiling repeats per shape (median taken)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_device_arg(p)
    byo = p.add_argument_group("bring your own")
    byo.add_argument("--texts", help="CSV/TSV of texts for hf:DIR (columns: text|sentence|content, label)")
    byo.add_argument("--text-column")
    byo.add_argument("--model", help="images: package.module:callable returning a torch.nn.Module")
    byo.add_argument("--images", help="images: a folder (class subfolders) or a CSV manifest (path,label)")
    byo.add_argument("--classes", type=int, help="images: number of classes the model outputs")
    byo.add_argument("--size", help="images: resize to HxW, e.g. 32x32")
    p.set_defaults(func=run)


def _load_workload(args: argparse.Namespace):  # -> Workload
    import importlib

    from apparate.cli import UserError

    name = args.workload
    if name.startswith("hf:"):
        if not args.texts:
            raise UserError("hf:DIR needs --texts FILE (a CSV/TSV with a text column)")
        from apparate.zoo.byo import hf_text_workload

        return hf_text_workload(name[3:], args.texts, args.text_column)
    if name == "images":
        if not (args.model and args.images and args.classes):
            raise UserError("images needs --model package.module:callable, --images DIR|MANIFEST and --classes N")
        mod, _, attr = args.model.partition(":")
        if not attr:
            raise UserError(f"--model must look like package.module:callable, got {args.model!r}")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise UserError(f"cannot load --model {args.model}: {e}") from None
        size = None
        if args.size:
            try:
                h, w = (int(v) for v in args.size.lower().split("x"))
                size = (h, w)
            except ValueError:
                raise UserError(f"--size must look like 32x32, got {args.size!r}") from None
        from apparate.zoo.byo import image_workload

        return image_workload(factory(), args.images, args.classes, size=size)
    from apparate.zoo.workloads import get_workload

    return get_workload(name, args.data_dir, progress=not args.no_progress)


def run(args: argparse.Namespace) -> int:
    from apparate.cli import UserError
    from apparate.zoo.workloads import list_workloads

    if args.list:
        print("\n".join(list_workloads()))
        return 0
    if not args.workload or not args.out:
        raise UserError("give a WORKLOAD and --out DIR (see `apparate prepare --list`)")
    t0 = time.perf_counter()
    import torch  # noqa: F401 - heavy import only now

    from apparate.devices import resolve_device

    device = resolve_device(args.device)  # no CUDA: a clear error before the workload loads
    from apparate.model.prepare import PrepareOptions, prepare_workload

    if args.threads is not None:
        torch.set_num_threads(args.threads)  # also covers fine-tuning and data preparation
    workload = _load_workload(args)
    info = workload.info or {}
    if "sst2_dev_accuracy" in info:
        print(f"sentiment model: SST-2 dev accuracy {info['sst2_dev_accuracy']:.1%} "
              f"(fine-tuned once in {info.get('train_seconds', '?')} s, cached)")
    if "held_back_accuracy" in info:
        print(f"camera model: {info['held_back_accuracy']:.1%} label accuracy on held-back frames "
              f"(fine-tuned once in {info.get('train_seconds', '?')} s after {info.get('cache_seconds', '?')} s "
              f"of frozen features, cached)")
    print(f"workload {workload.name}: {workload.description} (loaded in {time.perf_counter() - t0:.0f} s)")
    sites = [s.strip() for s in args.sites.split(",") if s.strip()] if args.sites else None
    opts = PrepareOptions(bootstrap=args.bootstrap, ramp=args.ramp, seed=args.seed, threads=args.threads,
                          max_batch=args.max_batch, epochs=args.epochs, lr=args.lr, holdout=args.holdout,
                          confidence=args.confidence, sites=sites, repeats=args.repeats, progress=not args.no_progress,
                          device=str(device))
    if workload.kind == "text" and args.ramp in ("pool", "conv"):
        raise UserError(f"--ramp {args.ramp} is for images; text takes cls, mean or deebert")
    if workload.kind == "image" and args.ramp in ("cls", "mean", "deebert"):
        raise UserError(f"--ramp {args.ramp} is for text; images take pool or conv")
    prepare_workload(workload, args.out, opts)
    print(f"done in {time.perf_counter() - t0:.0f} s wall time")
    return 0
