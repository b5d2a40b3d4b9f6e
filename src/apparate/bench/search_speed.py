"""`apparate bench tuning`: speed and quality of the threshold searches.

Prints (1) median time per greedy search against an artifact-style pure-Python search on the
same windows, interleaved, (2) the exhaustive grid search's time, and (3) the greedy result's
latency win as a share of the grid optimum under the same accuracy target.
"""

from __future__ import annotations

import argparse

import numpy as np


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tuning", help="threshold search speed and quality (greedy vs artifact-style vs grid)")
    p.add_argument("--repeats", type=int, default=15, help="timed rounds per case (interleaved)")
    p.add_argument("--seeds", type=int, default=20, help="windows per quality case")
    p.add_argument("--target", type=float, default=0.01, help="accuracy loss target for the searches")
    p.add_argument("--full", action="store_true", help="also time the artifact-style search on (20, 1024): slow")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from apparate.bench.artifact_search import artifact_style_search
    from apparate.bench.timing import interleaved_medians, markdown_table, thread_note
    from apparate.core.profile import LatencyProfile
    from apparate.core.synthetic import synthetic_window
    from apparate.core.tuning import greedy_thresholds, grid_thresholds

    print("# Threshold search benchmark\n")
    print(f"Synthetic windows (core/synthetic.py), target loss {args.target}, batch size 8 latency table; "
          f"{thread_note()}.\n")

    rows = []
    for R, N in ((3, 64), (8, 256), (20, 1024)):
        table = LatencyProfile.linear(R).table(8, list(range(R)))
        windows = [synthetic_window(N, R, seed=s) for s in range(4)]
        with_artifact = args.full or R * N <= 8 * 256
        k = iter(range(10**9))

        def ours():
            c, a = windows[next(k) % len(windows)]
            greedy_thresholds(c, a, table, args.target)

        funcs = [ours]
        if with_artifact:
            j = iter(range(10**9))

            def theirs():
                c, a = windows[next(j) % len(windows)]
                artifact_style_search(c, a, table.all_ms, args.target)

            funcs.append(theirs)
        reps = args.repeats if R * N <= 8 * 256 else max(3, args.repeats // 3)
        med = interleaved_medians(funcs, reps)
        # Both searches take the same decisions: check on the first window.
        c, a = windows[0]
        same = (np.allclose(greedy_thresholds(c, a, table, args.target).thresholds,
                            artifact_style_search(c, a, table.all_ms, args.target))
                if with_artifact else None)
        rows.append((f"({R}, {N})", f"{med[0] * 1e3:.3f}",
                     f"{med[1] * 1e3:.2f}" if with_artifact else "(--full)",
                     f"{med[1] / med[0]:.1f}x" if with_artifact else "-",
                     {True: "yes", False: "NO", None: "-"}[same]))
    print("## Greedy search: median ms per call\n")
    print(markdown_table(["(ramps, inputs)", "apparate ms", "artifact-style ms", "speed-up", "same thresholds"], rows))

    print("\n## Exhaustive grid (21 points per ramp) and greedy quality\n")
    rows = []
    for R, N in ((2, 64), (3, 64), (3, 256)):
        table = LatencyProfile.linear(R).table(8, list(range(R)))
        shares, g_times, x_times = [], [], []
        for s in range(args.seeds):
            c, a = synthetic_window(N, R, seed=100 + s)
            g, x = [], []
            gt, xt = interleaved_medians([lambda: g.append(greedy_thresholds(c, a, table, args.target)),
                                          lambda: x.append(grid_thresholds(c, a, table, args.target))], 1)
            g_times.append(gt)
            x_times.append(xt)
            grid_win = x[0].result.win
            if grid_win > 1e-9:
                shares.append(g[0].result.win / grid_win)
        rows.append((f"({R}, {N})", f"{np.median(g_times) * 1e3:.3f}", f"{np.median(x_times) * 1e3:.1f}",
                     f"{np.mean(shares):.3f}", f"{np.min(shares):.3f}", len(shares)))
    print(markdown_table(["(ramps, inputs)", "greedy ms", "grid ms", "greedy win / grid win (mean)", "(min)",
                          "windows"], rows))
    print("\nThe greedy search's steps are finer than the grid's, so it can beat the grid (share > 1).")
    print("Reproduce: apparate bench tuning" + (" --full" if args.full else ""))
    return 0
