"""The controller's memory: the feedback of the last W inputs, and what the current configuration
would have answered on them.

A ring buffer of W rows, one per input in arrival order: each site's confidence (NaN where the
site did not run for that input) and agreement, the batch size and cost key it was served at,
whether its answer as served agreed with the original, the site that released it, its batch.
Beside it, the counterfactual: would the *current* configuration's answer agree with the
original's? Valid where every firing ramp of that configuration ran. That is what lets the
controller's checks ask "would these thresholds break the constraint on the latest inputs?"
rather than "did the answers we happened to release?".

With early stop (`Feedback.weight`) a row can stand for several inputs: an exited input that
reached the final output only because it was sampled (probability p) has weight 1/p. Every
reading is weighted: `rows` repeats a row by its weight (so the tuner, the ramp utilities and
the emergency checks see the Horvitz-Thompson sample, unbiased for any thresholds), the loss
checks weight their sums, and the evidence is counted as Kish's effective sample size
(sum w)^2 / sum w^2, so margins are not fooled by repeated rows.

Rows are addressed by absolute input number (0 = the first input ever seen): `last(k, since)` is
the ring rows of the latest k inputs, none older than input `since` (the start of the current
regime, after a detected change in the inputs).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from .types import Config, Feedback, exit_sites_of, released


def effective_n(w: np.ndarray) -> float:
    """Kish's effective sample size of weighted rows: (sum w)^2 / sum w^2."""
    w = np.asarray(w, dtype=np.float64)
    return float(w.sum() ** 2 / (w * w).sum()) if w.size else 0.0


def _outer(rows: slice | np.ndarray) -> slice | np.ndarray:
    """Rows to index beside a column index array: a slice as it is, an index array as a column."""
    return rows if isinstance(rows, slice) else rows[:, None]


class Window:
    def __init__(self, size: int, num_sites: int) -> None:
        if size < 1 or num_sites < 0:
            raise ValueError(f"need size >= 1 and num_sites >= 0, got {size}, {num_sites}")
        W, S = size, num_sites
        self.size, self.num_sites = W, S
        self.conf = np.full((W, S), np.nan)
        self.agree = np.zeros((W, S), dtype=bool)
        self.bs = np.zeros(W)
        self.len = np.full(W, np.nan)
        self.correct = np.ones(W, dtype=bool)  # released answer agreed (as actually served)
        self.exit = np.full(W, -1, dtype=np.int64)  # site that released it, -1 = final output
        self.batch = np.full(W, -1, dtype=np.int64)  # batch index of each input
        self.cf_ok = np.ones(W, dtype=bool)  # the current config's answer would agree
        self.cf_valid = np.zeros(W, dtype=bool)  # ... and every firing ramp of it ran
        self.w = np.ones(W)  # inputs each row stands for (inverse sampling probability)
        self.written = 0

    # ------------------------------------------------------------------ writing
    def record(self, fb: Feedback, batch: int, config: Config) -> tuple[int, int]:
        """Append one batch (a batch larger than the window keeps its last W inputs); returns how
        many of its answers were wrong as served, and how many the current config answers wrongly."""
        W, n = self.size, fb.batch_size
        keep = min(n, W)
        r0 = (self.written + n - keep) % W
        # Rows as a slice unless the batch wraps around the ring (basic indexing: views, no copies).
        rows: slice | np.ndarray = slice(r0, r0 + keep) if r0 + keep <= W else (r0 + np.arange(keep)) % W
        rows2 = _outer(rows)
        cols = np.asarray(fb.sites, dtype=np.int64)
        exit_idx, ok = fb.released()
        ok_kept = ok[n - keep:]
        self.conf[rows] = np.nan
        self.agree[rows] = False
        if cols.size:
            self.conf[rows2, cols] = fb.conf[n - keep:]
            self.agree[rows2, cols] = fb.agree[n - keep:]
        self.bs[rows] = n
        self.len[rows] = np.nan if fb.length is None else fb.length
        self.correct[rows] = ok_kept
        self.exit[rows] = exit_sites_of(fb.sites)[exit_idx[n - keep:]]
        self.batch[rows] = batch
        self.w[rows] = 1.0 if fb.weight is None else fb.weight[n - keep:]
        self.written += n
        if fb.weight is not None:  # weighted counts: the inputs the sampled rows stand for
            wrong_served = float(fb.weight[~ok].sum())
            cf_wrong = float(self.w[rows][~ok_kept].sum()) if fb.sites == config.sites and \
                fb.thresholds == config.thresholds else None
        else:
            wrong_served = n - int(np.count_nonzero(ok))
            cf_wrong = None
        if fb.sites == config.sites and fb.thresholds == config.thresholds:
            self.cf_ok[rows] = ok_kept  # served with the current config: that is the answer
            self.cf_valid[rows] = True
            return wrong_served, keep - int(np.count_nonzero(ok_kept)) if cf_wrong is None else cf_wrong
        idx = rows if isinstance(rows, np.ndarray) else np.arange(rows.start, rows.stop)
        self.refresh(config, idx)
        bad = self.cf_valid[idx] & ~self.cf_ok[idx]
        return wrong_served, int(np.count_nonzero(bad)) if fb.weight is None else float(self.w[idx][bad].sum())

    def seed(self, conf: np.ndarray, agree: np.ndarray, batch_size: float, length: float | None, config: Config) -> None:
        """Start from inputs seen before serving (the bootstrap's held-out inputs, every site
        observed): the first tunes then have their evidence instead of none. They are the oldest
        inputs, so a detected change in the inputs leaves them behind. Batch index -1 marks them
        (not served: left out of the served statistics)."""
        n = conf.shape[0]
        if n == 0:
            return
        sites = tuple(range(self.num_sites))
        self.record(Feedback.trusted(sites, (0.0,) * self.num_sites, np.asarray(conf, dtype=np.float64),
                                     np.asarray(agree, dtype=bool), length), -1, config)
        rows = self.last(min(n, self.size))
        self.bs[rows] = batch_size

    def refresh(self, config: Config, rows: np.ndarray | None = None) -> None:
        """Recompute the counterfactual for some rows (default: the whole window)."""
        # The whole window is rows [0, min(written, size)): a slice (row order does not matter here).
        sel: slice | np.ndarray = slice(0, min(self.written, self.size)) if rows is None else rows
        sel2 = _outer(sel)
        firing = [j for j, t in enumerate(config.thresholds) if t > 0]
        if not firing:
            self.cf_ok[sel] = True
            self.cf_valid[sel] = True
            return
        cols = np.asarray(config.sites)
        conf = self.conf[sel2, cols]
        seen = ~np.isnan(conf)
        self.cf_valid[sel] = seen[:, firing].all(axis=1)
        _, ok = released(np.where(seen, conf, 0.0), self.agree[sel2, cols], np.asarray(config.thresholds))
        self.cf_ok[sel] = ok

    # ------------------------------------------------------------------ reading
    def last(self, k: int, since: int = 0) -> np.ndarray:
        """Ring rows of the latest k inputs (oldest first), none before input number `since`."""
        m = min(k, self.written - since, self.size)
        return np.arange(self.written - max(m, 0), self.written) % self.size

    def rows(self, sites: Sequence[int], need: Sequence[int], last: int, since: int = 0,
             default_bs: float = 1.0) -> tuple[np.ndarray, np.ndarray, float, float | None]:
        """Among the latest `last` inputs, those where every site in `need` ran: conf/agree for
        `sites` (0 confidence where a site did not run; a row repeated by its weight), mean batch
        size and length."""
        return self.weighted_rows(sites, need, last, since, default_bs)[:4]

    def weighted_rows(self, sites: Sequence[int], need: Sequence[int], last: int, since: int = 0,
                      default_bs: float = 1.0) -> tuple[np.ndarray, np.ndarray, float, float | None, float]:
        """`rows`, and the evidence they carry: Kish's effective sample size of the rows read
        (their number when no row is weighted)."""
        idx = self.last(last, since)
        cols = list(sites)
        read = cols + [c for c in dict.fromkeys(need) if c not in cols]  # the window is read once
        conf = self.conf[np.ix_(idx, read)]
        if need:
            keep = ~np.isnan(conf[:, [read.index(c) for c in need]]).any(axis=1)
            idx, conf = idx[keep], conf[keep]
        conf = np.nan_to_num(conf[:, :len(cols)], nan=0.0)
        agree = self.agree[np.ix_(idx, cols)]
        w = self.w[idx]
        if idx.size and w.max() > 1.0:
            reps = np.maximum(np.rint(w), 1).astype(np.int64)
            bs = float(np.average(self.bs[idx], weights=reps))
            return (np.repeat(conf, reps, axis=0), np.repeat(agree, reps, axis=0), bs, self.mean_length(idx),
                    effective_n(w))
        bs = float(self.bs[idx].mean()) if idx.size else float(default_bs)
        return conf, agree, bs, self.mean_length(idx), float(idx.size)

    def seen(self, sites: Sequence[int], last: int, since: int = 0) -> np.ndarray:
        """How many of the latest `last` inputs each site ran on: [len(sites)]."""
        idx = self.last(last, since)
        return (~np.isnan(self.conf[np.ix_(idx, list(sites))])).sum(axis=0)

    def mean_length(self, idx: np.ndarray) -> float | None:
        lens = self.len[idx]
        return float(np.nanmean(lens)) if idx.size and not np.isnan(lens).all() else None

    def counterfactual_loss(self, last: int, since: int = 0) -> tuple[float, float]:
        """(share of the latest inputs the current config would answer wrongly, the evidence:
        valid inputs, or their effective number when rows are weighted)."""
        idx = self.last(last, since)
        valid = self.cf_valid[idx]
        w = self.w[idx][valid]
        if not w.size:
            return 0.0, 0
        if w.max() == 1.0:
            return 1.0 - float(self.cf_ok[idx][valid].mean()), int(w.size)
        return float(w[~self.cf_ok[idx][valid]].sum() / w.sum()), effective_n(w)

    def recent_wrong(self, inputs: int) -> float:
        """Wrong answers, as served, among the latest `inputs` inputs (rows weighted by the inputs
        they stand for; the bootstrap's rows are never wrong)."""
        idx = self.last(inputs)
        w = self.w[idx][::-1]
        within = np.cumsum(w) - w < inputs  # newest first, until they stand for `inputs` inputs
        return float(w[within][~self.correct[idx][::-1][within]].sum())

    def change_point(self, constraint: float, since: int = 0) -> tuple[int, float]:
        """Where the current config's errors began to exceed the constraint: (input number,
        evidence). The start is the suffix of the window (from `since` on) that maximises
        sum(wrong - constraint) over its valid inputs (the CUSUM estimate of a change point); the
        evidence is that excess, in wrong answers (weighted rows: in observations, see below)."""
        idx = self.last(self.size, since)
        valid = self.cf_valid[idx]
        pos = np.flatnonzero(valid)  # positions in idx, oldest first
        if not pos.size:
            return self.written, 0.0
        wrong = ~self.cf_ok[idx[pos]]
        w = self.w[idx[pos]][::-1]
        excess = np.cumsum(w * (wrong[::-1] - constraint))  # over suffixes of growing length
        k = int(np.argmax(excess))
        first = pos[pos.size - 1 - k]  # the oldest input of the best suffix
        evidence = float(excess[k])
        if w.max() > 1.0:
            # In observations, not the inputs they stand for: one sampled wrong answer of weight 20
            # is one piece of evidence, not 20 (the excess over the suffix's design effect,
            # sum w^2 / sum w, which is 1 when no row is weighted).
            sw = w[: k + 1]
            evidence /= float((sw * sw).sum() / sw.sum())
        return self.written - (idx.size - first), evidence

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        return {
            "conf": np.where(np.isnan(self.conf), -1.0, self.conf).tolist(),
            "agree": self.agree.astype(int).tolist(),
            "bs": self.bs.tolist(),
            "len": np.where(np.isnan(self.len), -1.0, self.len).tolist(),
            "correct": self.correct.astype(int).tolist(),
            "exit": self.exit.tolist(),
            "batch": self.batch.tolist(),
            "w": self.w.tolist(),
            "written": self.written,
        }

    @classmethod
    def from_state(cls, w: Mapping[str, Any], size: int, num_sites: int, config: Config) -> "Window":
        win = cls(size, num_sites)
        conf = np.asarray(w["conf"], dtype=np.float64)
        if conf.shape != win.conf.shape:
            raise ValueError(f"window shape {conf.shape} does not match {win.conf.shape}")
        win.conf = np.where(conf < 0, np.nan, conf)
        win.agree = np.asarray(w["agree"], dtype=bool)
        win.bs = np.asarray(w["bs"], dtype=np.float64)
        lens = np.asarray(w["len"], dtype=np.float64)
        win.len = np.where(lens < 0, np.nan, lens)
        win.correct = np.asarray(w["correct"], dtype=bool)
        win.exit = np.asarray(w["exit"], dtype=np.int64)
        win.batch = np.asarray(w["batch"], dtype=np.int64)
        win.w = np.asarray(w.get("w", np.ones(size)), dtype=np.float64)
        win.written = int(w["written"])
        for name in ("agree", "bs", "len", "correct", "exit", "batch", "w"):
            want = (size, num_sites) if name == "agree" else (size,)
            if getattr(win, name).shape != want:
                raise ValueError(f"window field {name} has shape {getattr(win, name).shape}, not {want}")
        win.refresh(config)
        return win
