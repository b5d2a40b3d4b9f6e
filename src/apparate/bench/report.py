"""Comparison tables and plots for replay runs: a markdown table with ratios against vanilla and
the oracle, a JSON dump, a latency CDF per policy, and timelines of accuracy and active ramps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from apparate.replay.summary import Metrics
from apparate.replay.simulator import RunResult


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "-"
    return f"{x:.{digits}f}"


def comparison_table(metrics: Sequence[Metrics], baseline: str = "vanilla", oracle: str = "optimal") -> str:
    by = {m.policy: m for m in metrics}
    base, orc = by.get(baseline), by.get(oracle)
    head = ["policy", "p50 ms", "p95 ms", "p99 ms", "p50 vs vanilla", "p50 win", "share of optimal win",
            "acc vs original", "worst window", "label acc", "drops", "thru /s", "goodput /s", "ramps active",
            "mean batch"]
    rows = []
    for m in metrics:
        ratio = m.p50_ms / base.p50_ms if base else float("nan")
        win = 1 - ratio if base else float("nan")
        share = float("nan")
        if base and orc and base.p50_ms > orc.p50_ms:
            share = (base.p50_ms - m.p50_ms) / (base.p50_ms - orc.p50_ms)
        rows.append([m.policy, _fmt(m.p50_ms), _fmt(m.p95_ms), _fmt(m.p99_ms), _fmt(ratio, 3), f"{win:+.1%}",
                     _fmt(share, 2), f"{m.accuracy:.2%}", f"{m.worst_window_accuracy:.2%}",
                     "-" if m.label_accuracy is None else f"{m.label_accuracy:.2%}", str(m.dropped),
                     _fmt(m.throughput, 1), _fmt(m.goodput, 1), f"{m.active_share:.0%}", _fmt(m.mean_batch, 1)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(head), sep] + [line(r) for r in rows])


def _sliding(x: np.ndarray, window: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.size < window:
        return np.full(x.size, x.mean() if x.size else np.nan)
    c = np.concatenate([[0.0], np.cumsum(x)])
    out = np.full(x.size, np.nan)
    out[window - 1:] = (c[window:] - c[:-window]) / window
    return out


def policy_style(policy: str) -> dict[str, Any]:
    """One look per policy in every plot: a colour of its own (tab20 has room for all of them),
    dashed lines for the DeeBERT family, a thick line for apparate."""
    import matplotlib

    from apparate.policies.catalog import POLICIES

    names = list(POLICIES)
    k = names.index(policy) if policy in names else len(names)
    color = "black" if policy == "apparate" else matplotlib.colormaps["tab20"](k % 20)
    return dict(color=color, lw=2.4 if policy == "apparate" else 1.2,
                ls="--" if policy.startswith("deebert") else "-")


def plot_latency_cdf(runs: Sequence[RunResult], path: Path, slo_ms: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        lat = np.sort(run.latency_ms[run.served])
        if lat.size:
            ax.plot(lat, np.arange(1, lat.size + 1) / lat.size, label=run.policy, **policy_style(run.policy))
    if slo_ms:
        ax.axvline(slo_ms, color="grey", ls=":", lw=1, label="SLO")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("share of requests")
    ax.set_title("Latency CDF per policy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_timeline(runs: Sequence[RunResult], path: Path, constraint: float, window: int = 500,
                  phases: np.ndarray | None = None) -> Path:
    """Sliding accuracy vs the original (each policy) and which ramps are active over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for run in runs:
        if run.policy in ("vanilla", "optimal", "optimal-cost"):
            continue
        served = run.served
        t = run.arrival[served]
        ax1.plot(t, _sliding(run.correct[served], window), label=run.policy, **policy_style(run.policy))
    ax1.axhline(1 - constraint, color="red", ls="--", lw=1, label=f"constraint ({1 - constraint:.0%})")
    ax1.set_ylabel(f"accuracy vs original\n(sliding {window})")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=3)
    # Which candidate ramps are active over time: a raster per adaptive/static policy.
    shown = [r for r in runs if r.policy in ("apparate", "static") and r.batch_start.size]
    for k, run in enumerate(shown):
        ends = np.append(run.batch_start[1:], run.batch_start[-1] + run.batch_exec_ms[-1] * 1e-3)
        offset = (k - (len(shown) - 1) / 2) * 0.25
        for site in sorted({x for sites in run.batch_sites for x in sites}):
            on = np.array([site in sites for sites in run.batch_sites])
            starts = np.flatnonzero(on & ~np.append(False, on[:-1]))
            stops = np.flatnonzero(on & ~np.append(on[1:], False))
            ax2.hlines(np.full(starts.size, site + offset), run.batch_start[starts], ends[stops], lw=4,
                       color=policy_style(run.policy)["color"], label=f"{run.policy}" if site == min(x for s_ in run.batch_sites for x in s_) else None)
    if phases is not None and runs:
        t = runs[0].arrival
        change = np.flatnonzero(np.diff(phases[: t.size]) != 0)
        for c in change:
            for ax in (ax1, ax2):
                ax.axvline(t[c + 1], color="grey", lw=0.6, alpha=0.6)
    if shown:  # every candidate site on the axis, so that an absent ramp reads as absent
        num_sites = shown[0].num_sites
        ax2.set_ylim(-0.5, num_sites - 0.5)
        ax2.set_yticks(range(num_sites) if num_sites <= 30 else range(0, num_sites, 5))
        if ax2.get_legend_handles_labels()[0]:  # policies with no ramp active draw nothing
            ax2.legend(fontsize=7)
    ax2.set_ylabel("active ramp sites")
    ax2.set_xlabel("time (s)" + ("; grey lines: stream phase changes" if phases is not None else ""))
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_exits(runs: Sequence[RunResult], path: Path, phases: np.ndarray | None = None,
               policies: Sequence[str] = ("apparate", "optimal"), window: int = 100) -> Path:
    """Where on the stream the ramps fire: each request's exit site over time (one panel per
    policy), and the share of requests released early over a sliding window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from apparate.replay.simulator import FINAL

    shown = [r for p in policies for r in runs if r.policy == p]
    fig, axes = plt.subplots(len(shown) + 1, 1, figsize=(9, 2.4 * (len(shown) + 1)), sharex=True, squeeze=False)
    axes = axes[:, 0]
    for ax, run in zip(axes, shown):
        served = run.served
        site = np.where(run.exit_site == FINAL, run.num_sites, run.exit_site)
        early = served & (run.exit_site != FINAL)
        ax.scatter(run.arrival[early], site[early], s=2, color=policy_style(run.policy)["color"], label="ramp exit")
        late = served & ~early
        ax.scatter(run.arrival[late], site[late], s=2, color="lightgrey", label="final output")
        ax.set_ylim(-0.5, run.num_sites + 0.5)
        ax.set_ylabel(f"{run.policy}\nexit site")
        ax.grid(alpha=0.3)
    for run in shown:
        t = run.arrival[run.served]
        ax = axes[-1]
        ax.plot(t, _sliding(run.exit_site[run.served] != FINAL, window), label=run.policy, **policy_style(run.policy))
    axes[-1].set_ylabel(f"released early\n(sliding {window})")
    axes[-1].set_ylim(-0.02, 1.02)
    axes[-1].grid(alpha=0.3)
    if shown:
        axes[-1].legend(fontsize=7)
    if phases is not None and runs:
        t = runs[0].arrival
        for c in np.flatnonzero(np.diff(phases[: t.size]) != 0):
            for ax in axes:
                ax.axvline(t[c + 1], color="grey", lw=0.8, alpha=0.7)
    axes[-1].set_xlabel("time (s)" + ("; grey lines: stream phase changes" if phases is not None else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: str | Path, metrics: Sequence[Metrics], runs: Sequence[RunResult], info: dict[str, Any],
                 command: str, constraint: float, phases: np.ndarray | None = None) -> Path:
    """report.md, metrics.json, latency_cdf.png, timeline.png, exits.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(metrics)
    plot_latency_cdf(runs, out / "latency_cdf.png", info.get("slo_ms"))
    plot_timeline(runs, out / "timeline.png", constraint, phases=phases)
    plot_exits(runs, out / "exits.png", phases=phases)
    lines = ["# Policy comparison", "", "```", command, "```", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += ["", table, "", "![latency CDF](latency_cdf.png)", "", "![timeline](timeline.png)", "",
              "![exits](exits.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "metrics.json").write_text(json.dumps({"info": info, "command": command,
                                                  "metrics": [m.to_dict() for m in metrics]}, indent=1))
    return out / "report.md"
