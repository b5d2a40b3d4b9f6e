"""`apparate record BUNDLE --stream NAME --out FILE.npz`: every candidate ramp's outputs on a stream."""

from __future__ import annotations

import argparse

from apparate.devices import add_device_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("record", help="run a bundle over a stream once, every ramp active, and save the outputs",
                       description=__doc__)
    p.add_argument("bundle", help="bundle directory (from `apparate prepare`)")
    p.add_argument("--stream", required=True,
                   help="stream name of the bundle's workload (e.g. camera-day, test, drift), or your own: "
                        "video:PATH (a video file, or a folder of them played in name order), images:PATH (a "
                        "folder of class subfolders, a flat folder, or a CSV manifest with path[,label]), "
                        "csv:PATH (a CSV/TSV of texts with a text column and optionally label)")
    p.add_argument("--fps", type=float, help="video:PATH: frame timestamps at this rate (default: the clip's own)")
    p.add_argument("--out", required=True, help="recording file to write (.npz)")
    p.add_argument("--n", type=int, help="inputs (default: the stream's own size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int)
    p.add_argument("--data-dir")
    p.add_argument("--no-move", action="store_true",
                   help="do not record how far each site's features moved since the previous input (image "
                        "streams; the learned exit rule's difference detector: 4 bytes per input and site)")
    p.add_argument("--features", action="store_true",
                   help="also record what each ramp's linear head reads, and the heads, for heads that keep "
                        "learning (`--policy apparate+heads`; float16, each site's width x 2 bytes per input)")
    p.add_argument("--no-progress", action="store_true")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apparate.zoo.bundles import load_bundle
    from apparate.bench.record import record_stream
    from apparate.zoo.own_streams import check_stream, resolve_stream

    from apparate.devices import resolve_device

    device = resolve_device(args.device)  # no CUDA: a clear error before anything loads
    check_stream(args.stream)  # an unreadable file or malformed row fails before the model loads
    bundle = load_bundle(args.bundle, data_dir=args.data_dir, device=device)
    if bundle.workload is None:
        raise ValueError(f"bundle {args.bundle} has no workload to draw streams from")
    stream = resolve_stream(bundle.workload, args.stream, seed=args.seed, n=args.n, fps=args.fps)
    rec = record_stream(bundle, stream, args.batch_size, progress=not args.no_progress, threads=args.threads,
                        move=not args.no_move, features=args.features)
    path = rec.save(args.out)
    agree = rec.agree.mean(axis=0)
    print(f"recorded {rec.num_inputs} inputs x {rec.num_sites} sites to {path} ({path.stat().st_size / 1e6:.2f} MB)")
    if rec.move is not None:
        print(f"feature movement per site kept: {rec.move.nbytes / 1e6:.2f} MB in memory, before compression "
              "(--no-move leaves it out)")
    if rec.features is not None:
        print(f"ramp features kept: {sum(f.nbytes for f in rec.features) / 1e6:.2f} MB in memory, before compression")
    print("per-site agreement with the original: " + " ".join(f"{a:.0%}" for a in agree))
    return 0
