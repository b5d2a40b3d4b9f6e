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
answer); the first `--train` inputs only train.

`--heads` adds, per site, what its ramp gives on heads that keep learning (`core.heads`, as
`apparate+heads` replays them: retrained on the stream's final answers, behind their guard):
its agreement and the share a hindsight threshold on its confidence releases. It needs the
ramps' features recorded (once, cached).
"""

from __future__ import annotations

import argparse

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
    p.add_argument("--heads", action="store_true", help="also heads that keep learning (records the ramps' features once)")
    p.set_defaults(func=run)


def online_scores(X: np.ndarray, agree: np.ndarray, train: int, refit: int, l2: float) -> np.ndarray:
    """[N] out-of-sample scores of one site: each block of `refit` inputs scored by the fit on the
    `train` inputs before it; NaN for the first `train` inputs."""
    from apparate.core.evidence import fit_logistic

    n = X.shape[0]
    out = np.full(n, np.nan)
    for a in range(train, n, refit):
        w = fit_logistic(X[a - train:a], agree[a - train:a].astype(np.float64), l2)
        out[a:a + refit] = 1.0 / (1.0 + np.exp(-np.clip(X[a:a + refit] @ w, -30, 30)))
    return out


def run(args: argparse.Namespace) -> int:
    from apparate.bench.experiment import bundle_and_recording
    from apparate.bench.experiment_args import command_line, spec_from_args
    from apparate.bench.timing import markdown_table
    from apparate.core.evidence import StreamContext, features

    spec = spec_from_args(args)
    log = print if spec.progress else (lambda _s: None)
    bundle, stream, rec = bundle_and_recording(spec, log)
    losses = [float(x) for x in args.loss.split(",")]
    settings = spec.settings_for(bundle.kind)
    if rec.num_inputs <= args.train:
        raise ValueError(f"the stream has {rec.num_inputs} inputs: no more than --train {args.train}")
    S = rec.num_sites
    sites = np.arange(S)
    last = np.concatenate([[-1], rec.final[:-1].astype(np.int64)])
    X = features(rec.conf.astype(np.float64), rec.pred.astype(np.int64), sites, StreamContext.empty(S), rec.move, last)
    agree = rec.agree
    heads = _relearned(bundle, stream, spec, settings, log) if args.heads else None
    rows = []
    for j in range(S):
        sc = online_scores(X[:, j], agree[:, j], args.train, args.refit, settings.evidence_l2)
        m = ~np.isnan(sc)
        conf_sh = [release_share(rec.conf[m, j].astype(np.float64), agree[m, j], L) for L in losses]
        learn_sh = [release_share(sc[m], agree[m, j], L) for L in losses]
        rows.append([str(j), rec.site_names[j] if rec.site_names else "", f"{agree[m, j].mean():.1%}"]
                    + [f"{c:.1%} / {lr:.1%}" for c, lr in zip(conf_sh, learn_sh)])
        if heads is not None:
            ok = heads.agree[m, j]
            rows[-1] += [f"{ok.mean():.1%}"] + [f"{release_share(heads.conf[m, j].astype(np.float64), ok, L):.1%}"
                                                for L in losses]
    n_eval = rec.num_inputs - args.train
    print(f"# Evidence: {spec.workload}, stream {stream}, {n_eval} inputs scored out of sample "
          f"(fits on the latest {args.train}, every {args.refit}); feature movement "
          f"{'recorded' if rec.move is not None else 'not recorded (text, or an old recording)'}\n")
    cols = ["site", "module", "agrees"] + [f"released at <= {L:.1%} loss: confidence / learned" for L in losses]
    if heads is not None:
        cols += ["heads agree"] + [f"heads release <= {L:.1%}" for L in losses]
    print(markdown_table(cols, rows))
    print(f"\nreproduce: {command_line()}")
    return 0


def _relearned(bundle, stream: str, spec, settings, log):
    from apparate.bench.experiment import load_or_record, relearned

    frec = load_or_record(bundle, stream, spec.n, spec.seed, spec, log, features=True)
    return relearned(frec, settings, log)[0]
