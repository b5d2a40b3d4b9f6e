"""`apparate bench evidence WORKLOAD`: per candidate site, the share of inputs a ramp could
release within a loss, ranked by its confidence against ranked by the learned exit rule's score.

On the workload's recording (as `bench compare` prepares and records it), each site's learned
predictor (`core.evidence.fit_logistic`, as the policy fits it but without its guard, and with
every site seen on every input) is fitted on the latest `--train` inputs, every `--refit` inputs,
and scores only the inputs after its fit (out of sample). For each site
alone, the inputs are ranked by confidence, and by the learned score, and the largest share that a
threshold on each (whole groups of tied scores) releases with at most `--loss` of all inputs
answered wrongly is printed: what each kind of evidence could give that site with a threshold
chosen in hindsight. Inputs are served one at a time here (each knows the previous input's final
answer); the first `--train` inputs only train (`--start N`: scoring starts at input N, each fit
on the at most `--train` inputs before). `--blocks B` adds the share a threshold chosen in
hindsight for each block of B inputs releases (what following the stream could give at most); the
`--windows` adds the share one threshold releases when every window of 500 inputs must also stay
within 1.5x the loss (the reports' worst-window check). The "exit cost" column is a single ramp's exit at batch 1 over a pass, so a site releasing more than
half the inputs puts the median there.

`--causal` adds what a tuner that follows the stream releases, using only answers already known:
every 16 inputs the threshold is re-tuned on the latest 1,024 scored inputs at the controller's
own target (the constraint less its margin, `tuning_target`), for one ramp alone at that site;
with the learned score it also shows the wrong share, the worst window of 500, and the median
cost of an input at batch 1 if this ramp ran alone from the start (its exit cost for the inputs it
releases, a whole pass for the rest; ramp costs and queueing left out): a site that releases more
than half the inputs puts the median at its exit cost.

`--heads` adds, per site, what its ramp gives on heads that keep learning (`core.heads`:
retrained on the stream's final answers, behind their guard) if every site's head learned from
every input: its agreement and the share a hindsight threshold on its confidence releases. An
upper bound for `apparate+heads`, whose heads learn only where its ramps run. It needs the
ramps' features recorded (once, cached).
"""

from __future__ import annotations

import argparse
from typing import Callable

import numpy as np

from apparate.core.evidence import release_share


def register(sub: argparse._SubParsersAction) -> None:
    from apparate.bench.experiment_args import add_experiment_args

    p = sub.add_parser("evidence", help="per site: what confidence and the learned exit rule could release",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_experiment_args(p)
    p.add_argument("--loss", default="0.004,0.01", help="losses to report, comma-separated (default %(default)s)")
    p.add_argument("--train", type=int, default=1024, help="inputs each fit uses (default 1024)")
    p.add_argument("--refit", type=int, default=256, help="inputs between fits (default 256)")
    p.add_argument("--start", type=int, help="first input scored: fits from then on use the (at most --train) "
                                             "inputs before (default --train; the policy starts at 128)")
    p.add_argument("--blocks", type=int, help="also the share released when each block of this many inputs gets "
                                              "its own hindsight threshold (what following the stream could give)")
    p.add_argument("--windows", action="store_true", help="also the share one threshold releases when, besides the loss "
                                                          "overall, every window of 500 inputs stays within 1.5x it")
    p.add_argument("--causal", action="store_true", help="also what a threshold re-tuned every 16 inputs on the latest "
                                                         "1,024 (at the tuner's target) releases, site by site")
    p.add_argument("--heads", action="store_true", help="also heads that keep learning (records the ramps' features once)")
    p.set_defaults(func=run)


def online_scores(X: np.ndarray, agree: np.ndarray, train: int, refit: int, l2: float,
                  start: int | None = None) -> np.ndarray:
    """[N] out-of-sample scores of one site: each block of `refit` inputs scored by the fit on the
    (at most `train`) inputs before it, from input `start` on (default `train`); NaN before."""
    from apparate.core.evidence import fit_logistic

    n = X.shape[0]
    out = np.full(n, np.nan)
    for a in range(train if start is None else start, n, refit):
        lo = max(0, a - train)
        w = fit_logistic(X[lo:a], agree[lo:a].astype(np.float64), l2)
        out[a:a + refit] = 1.0 / (1.0 + np.exp(-np.clip(X[a:a + refit] @ w, -30, 30)))
    return out


def causal_release(score: np.ndarray, ok: np.ndarray, target: Callable[[int], float], every: int = 16,
                   window: int = 1024) -> np.ndarray:
    """[N] which inputs a threshold that follows the stream releases: before every block of `every`
    inputs it is tuned on the latest `window` scored inputs (NaN: not scored) with the largest
    release whose loss there is at most `target(n)`, n the inputs it was tuned on. Only answers
    of inputs before the block are used (a server knows them once their batches ended)."""
    n = score.size
    valid = ~np.isnan(score)
    out = np.zeros(n, dtype=bool)
    for a in range(0, n, every):
        past = np.flatnonzero(valid[:a])[-window:]
        if past.size == 0:
            continue
        share = release_share(score[past], ok[past], target(past.size))
        if share <= 0:
            continue
        level = np.sort(score[past])[::-1][int(round(share * past.size)) - 1]  # whole tie groups from it
        blk = slice(a, a + every)
        out[blk] = valid[blk] & (score[blk] >= level)
    return out


def by_blocks(score: np.ndarray, ok: np.ndarray, loss: float, block: int) -> float:
    """Share of all inputs released when each block of `block` consecutive inputs gets its own
    hindsight threshold at `loss` (of that block's inputs)."""
    n = score.size
    got = sum(release_share(score[a:a + block], ok[a:a + block], loss) * min(block, n - a) for a in range(0, n, block))
    return float(got) / n if n else 0.0


def within_windows(score: np.ndarray, ok: np.ndarray, loss: float, window: int = 500, slack: float = 1.5) -> float:
    """Largest share one threshold on `score` releases (whole tie groups) with at most `loss` of
    all inputs released wrongly and at most `slack` x `loss` of every `window` consecutive inputs
    (releasing more only adds wrong answers to every window, so the largest is found by bisection)."""
    from apparate.core.exits import sliding_min_mean

    n = score.size
    levels = np.unique(score)[::-1]  # thresholds from the strictest: release score >= level
    best, lo, hi = 0.0, 0, levels.size - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        out = score >= levels[mid]
        correct = ~out | ok
        if (~correct).sum() <= loss * n + 1e-9 and sliding_min_mean(correct, window) >= 1 - slack * loss - 1e-12:
            best, lo = float(out.mean()), mid + 1
        else:
            hi = mid - 1
    return best


def run(args: argparse.Namespace) -> int:
    from apparate.bench.experiment import bundle_and_recording
    from apparate.bench.experiment_args import command_line, spec_from_args
    from apparate.bench.timing import markdown_table
    from apparate.core.evidence import StreamContext, features
    from apparate.core.exits import sliding_min_mean

    spec = spec_from_args(args)
    log = print if spec.progress else (lambda _s: None)
    bundle, stream, rec = bundle_and_recording(spec, log)
    losses = [float(x) for x in args.loss.split(",")]
    settings = spec.settings_for(bundle.kind)
    start = args.train if args.start is None else args.start
    if not 1 <= start < rec.num_inputs:
        raise ValueError(f"the stream has {rec.num_inputs} inputs: the first scored (--start/--train {start}) "
                         "must be one of them, after at least one")
    if args.blocks is not None and args.blocks < 1:
        raise ValueError("--blocks must be >= 1")
    table1 = bundle.profile.table(1.0, range(rec.num_sites))
    exit_cost = (table1.site_ms + table1.ramp_ms) / table1.vanilla_ms  # one ramp, batch 1
    S = rec.num_sites
    sites = np.arange(S)
    last = np.concatenate([[-1], rec.final[:-1].astype(np.int64)])
    X = features(rec.conf.astype(np.float64), rec.pred.astype(np.int64), sites, StreamContext.empty(S), rec.move, last)
    agree = rec.agree
    heads = _relearned(bundle, stream, spec, settings, log) if args.heads else None
    rows = []
    for j in range(S):
        sc = online_scores(X[:, j], agree[:, j], args.train, args.refit, settings.evidence_l2, start)
        m = ~np.isnan(sc)
        conf_j = rec.conf[:, j].astype(np.float64)
        conf_sh = [release_share(conf_j[m], agree[m, j], L) for L in losses]
        learn_sh = [release_share(sc[m], agree[m, j], L) for L in losses]
        rows.append([str(j), rec.site_names[j] if rec.site_names else "", f"{exit_cost[j]:.2f}", f"{agree[m, j].mean():.1%}"]
                    + [f"{c:.1%} / {lr:.1%}" for c, lr in zip(conf_sh, learn_sh)])
        if args.blocks:
            rows[-1] += [f"{by_blocks(conf_j[m], agree[m, j], L, args.blocks):.1%} / "
                         f"{by_blocks(sc[m], agree[m, j], L, args.blocks):.1%}" for L in losses]
        if args.windows:
            rows[-1] += [f"{within_windows(conf_j[m], agree[m, j], L):.1%} / {within_windows(sc[m], agree[m, j], L):.1%}"
                         for L in losses]
        if args.causal:
            rc = causal_release(conf_j[m], agree[m, j], settings.tuning_target)
            rl = causal_release(sc[m], agree[m, j], settings.tuning_target)
            wrong = rl & ~agree[m, j]
            alone = np.median(np.where(rl, exit_cost[j], 1.0))  # batch 1: an exit costs its site, the rest a pass
            rows[-1] += [f"{rc.mean():.1%} / {rl.mean():.1%}", f"{wrong.mean():.2%}",
                         f"{sliding_min_mean(~wrong, 500):.1%}", f"{alone:.2f}"]
        if heads is not None:
            ok = heads.agree[m, j]
            rows[-1] += [f"{ok.mean():.1%}"] + [f"{release_share(heads.conf[m, j].astype(np.float64), ok, L):.1%}"
                                                for L in losses]
    n_eval = rec.num_inputs - start
    print(f"# Evidence: {spec.workload}, stream {stream}, {n_eval} inputs scored out of sample from input {start} "
          f"(fits on the latest {args.train} at most, every {args.refit}); exit cost: one ramp's exit at batch 1 over "
          f"a pass; feature movement "
          f"{'recorded' if rec.move is not None else 'not recorded (text, or an old recording)'}\n")
    cols = ["site", "module", "exit cost", "agrees"] + [f"released at <= {L:.1%} loss: confidence / learned"
                                                         for L in losses]
    if args.blocks:
        cols += [f"per block of {args.blocks}, <= {L:.1%}: confidence / learned" for L in losses]
    if args.windows:
        cols += [f"<= {L:.1%} and every 500 within {1.5 * L:.1%}: confidence / learned" for L in losses]
    if args.causal:
        cols += [f"causal at the tuner's target ({settings.tuning_target(1024):.2%} on 1,024): confidence / learned",
                 "learned: wrong", "learned: worst 500", "learned: median cost, this ramp alone"]
    if heads is not None:
        cols += ["heads agree"] + [f"heads release <= {L:.1%}" for L in losses]
    print(markdown_table(cols, rows))
    print(f"\nreproduce: {command_line()}")
    return 0


def _relearned(bundle, stream: str, spec, settings, log):
    """The stream's ramp answers as heads that keep learning at every site would have given them
    (`core.heads.relearn`: what the evidence could be, not what a server's active sites learn)."""
    from apparate.bench.experiment import load_or_record
    from apparate.core.heads import HeadLearning, relearn

    frec = load_or_record(bundle, stream, spec.n, spec.seed, spec, log, features=True)
    conf, pred, hlog = relearn(list(frec.features), list(frec.heads), frec.final, HeadLearning.from_settings(settings))
    swaps = {s: at for s, at in enumerate(hlog.swaps) if at}
    log(f"heads that keep learning: new heads went live at {sum(map(len, swaps.values()))} judgements of "
        f"{sum(map(len, hlog.judged))} (site: inputs) {swaps}")
    return frec.with_answers(conf, pred)
