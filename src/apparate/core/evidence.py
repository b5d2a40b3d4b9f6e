"""Learned evidence for every exit: P(this ramp's answer equals the final one), from the stream.

A ramp's max-probability confidence is weak evidence where the win is (an early ramp of a video
model is unsure on nearly every frame), yet every served input's final answer is a free label for
what predicts agreement. Per candidate site a small logistic model is fitted on the latest inputs
that ran the site, from evidence that is cheap there and known when a batch reaches the site:

* `logit`: the logit of the ramp's confidence;
* `repeat`: the ramp's answer equals the latest final answer known (the last input of the
  previous batch: batches run one after another, so its final answer is in when the next forms);
* `same`: the ramp's answer equals its own answer on the previous input (the row above in the
  batch, or the previous batch's last input), and `still`: how little its confidence moved since
  then (1 - |change|);
* `lmove`: the log of how far the site's pooled features moved since the previous input
  (relative L2 change; recorded for image streams): a difference detector, as video analytics
  skips frames that did not change. Where unknown it reads as a 100% change.

On an ordered stream (a fixed camera) the scene repeats, and these separate the inputs whose
early answer will agree from the rest far better than confidence alone; on independent inputs
their weights fit to about nothing and the score falls back to calibrated confidence.

The model's output replaces the confidence everywhere downstream (the exit rule `1 - score < t`,
the controller's window, the tuner), so a threshold keeps its meaning. After each refit the
window is re-scored from the features kept beside it, so the tuner never mixes scores of two fits.
Until a site has `min_inputs` labelled inputs its score is its confidence.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .types import Feedback

FEATURES = ("bias", "logit", "repeat", "same", "still", "lmove", "repeat*logit", "repeat*still", "repeat*lmove")
F = len(FEATURES)
_EPS = 1e-4


@dataclass
class StreamContext:
    """What a batch's features need of the inputs before it: the latest final answer known, and
    per site the previous input's answer and confidence (-1 / NaN where the site did not run)."""

    last_final: int
    prev_pred: np.ndarray  # [S] int
    prev_conf: np.ndarray  # [S] float

    @classmethod
    def empty(cls, num_sites: int) -> "StreamContext":
        return cls(-1, np.full(num_sites, -1, dtype=np.int64), np.full(num_sites, np.nan))

    def advance(self, sites: np.ndarray, conf: np.ndarray, pred: np.ndarray, final: np.ndarray) -> None:
        """After a batch: its last input becomes the previous one (at the sites that ran)."""
        if final.size == 0:
            return
        self.last_final = int(final[-1])
        self.prev_pred[:] = -1
        self.prev_conf[:] = np.nan
        self.prev_pred[sites] = pred[-1]
        self.prev_conf[sites] = conf[-1]


def features(conf: np.ndarray, pred: np.ndarray, sites: np.ndarray, ctx: StreamContext,
             move: np.ndarray | None = None, last_final: np.ndarray | None = None) -> np.ndarray:
    """[n, R, F] evidence for n inputs (in arrival order) at R sites: conf, pred [n, R]; `move`
    [n, R] the sites' feature movement (None or NaN: unknown); `last_final` [n], if given, the
    latest final answer each input could know (default: the context's, for a whole batch)."""
    n, R = conf.shape
    X = np.empty((n, R, F))
    if n == 0:
        return X
    c = np.clip(conf, _EPS, 1 - _EPS)
    logit = np.log(c / (1 - c))
    last = ctx.last_final if last_final is None else np.asarray(last_final)[:, None]
    repeat = (pred == last).astype(np.float64)
    prev_pred = np.concatenate([ctx.prev_pred[sites][None, :], pred[:-1]], axis=0)
    prev_conf = np.concatenate([ctx.prev_conf[sites][None, :], conf[:-1]], axis=0)
    same = (pred == prev_pred).astype(np.float64)
    still = 1.0 - np.abs(conf - np.nan_to_num(prev_conf, nan=1.0 + conf))  # unknown: "moved a lot"
    still = np.clip(still, 0.0, 1.0)
    lmove = np.zeros((n, R)) if move is None else np.log(np.nan_to_num(np.asarray(move, dtype=np.float64), nan=1.0) + 1e-3)
    X[..., 0] = 1.0
    X[..., 1] = logit
    X[..., 2] = repeat
    X[..., 3] = same
    X[..., 4] = still
    X[..., 5] = lmove
    X[..., 6] = repeat * logit
    X[..., 7] = repeat * still
    X[..., 8] = repeat * lmove
    return X


def features_one(conf: float, pred: int, last_final: int, prev_pred: int, prev_conf: float,
                 move: float | None = None) -> list[float]:
    """`features` for one input at one site, in plain floats, bit for bit: the same values for a
    small batch, where numpy's per-call cost is most of the work (a live server at batch 1 pays
    this inside the model, on every active ramp that can release). `prev_pred`, `prev_conf`: the
    site's answer and confidence on the input before (-1, NaN: unknown); `last_final`: the latest
    final answer known."""
    c = min(max(conf, _EPS), 1 - _EPS)
    logit = float(np.log(c / (1 - c)))  # numpy's log, not math's: they differ in the last bit
    repeat = float(pred == last_final)
    same = float(pred == prev_pred)
    still = 1.0 - abs(conf - (1.0 + conf if math.isnan(prev_conf) else prev_conf))
    still = min(max(still, 0.0), 1.0)
    lmove = 0.0 if move is None else float(np.log((1.0 if math.isnan(move) else move) + 1e-3))
    return [1.0, logit, repeat, same, still, lmove, repeat * logit, repeat * still, repeat * lmove]


def movement_one(f: Sequence[float], prev: Sequence[float] | None) -> float:
    """How far one input's pooled features f [D] moved from the previous input's (relative L2
    change, |f - prev| / |prev|), as a float32 value; NaN where the previous input is unknown
    (None). In plain floats (`math.dist`, `math.hypot`): a server's hook pays this at batch 1
    inside the model, where each numpy call costs several times what it costs warm. Lists are
    the cheap argument (`ndarray.tolist()`); arrays work too."""
    if prev is None:
        return math.nan
    return _float32(math.dist(f, prev) / max(math.hypot(*prev), 1e-8))


def movement(f: np.ndarray, prev: np.ndarray | None) -> np.ndarray:
    """[n] float32 `movement_one` of each row of pooled features f [n, D] from the row before it;
    the first row compares with `prev` [1, D], the previous input's (None: unknown, NaN). One
    function for the recording (`bench.record`) and the live server (`serve.executor`), built on
    the per-input one so the two agree bit for bit."""
    rows = np.asarray(f).tolist()
    before = [None if prev is None else np.asarray(prev).reshape(-1).tolist()] + rows[:-1]
    return np.array([movement_one(a, b) for a, b in zip(rows, before)], dtype=np.float32)


def _float32(x: float) -> float:
    """x rounded to the nearest float32 (as numpy's cast rounds), kept a Python float."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:  # beyond float32: numpy's cast gives an infinity
        return math.copysign(math.inf, x)


_F32 = struct.Struct("f")


def score_with(weights: np.ndarray, X: np.ndarray, sites: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """[n, R] P(agree) at the given sites under per-site weights [S, F] (a NaN row: not fitted
    yet, the score is the confidence). The one scoring rule of `EvidenceModel` and `Scorer`."""
    raw = weights[sites]  # [R, F]
    W = np.nan_to_num(raw)
    # a plain sum, feature by feature, in order: the arithmetic `Scorer.score_one` repeats in
    # plain floats for a batch of one (an einsum may sum in another order)
    z = X[..., 0] * W[:, 0]
    for f in range(1, X.shape[-1]):
        z = z + X[..., f] * W[:, f]
    out = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
    unfitted = np.isnan(raw[:, 0])
    if unfitted.any():
        out[:, unfitted] = conf[:, unfitted]
    return out


@dataclass(frozen=True, eq=False)
class Scorer:
    """A fitted evidence model as an immutable value (its weights [S, F], read-only, and version):
    what a live server's executor scores with, swapped whole by the control thread after a refit."""

    version: int
    weights: np.ndarray

    def score(self, X: np.ndarray, sites: np.ndarray, conf: np.ndarray) -> np.ndarray:
        return score_with(self.weights, X, sites, conf)

    def score_one(self, x: list[float], site: int, conf: float) -> float:
        """`score` of one input at one site (`features_one`'s x), in plain floats and the same
        arithmetic, bit for bit: a server's hook at batch 1 decides as the replay does."""
        rows = self.__dict__.get("_rows")
        if rows is None:  # the weights as lists, once per scorer (it is immutable)
            rows = [None if np.isnan(w[0]) else w.tolist() for w in self.weights]
            object.__setattr__(self, "_rows", rows)
        w = rows[site]
        if w is None:
            return conf
        z = x[0] * w[0]
        for a, b in zip(x[1:], w[1:]):
            z = z + a * b
        return 1.0 / (1.0 + float(np.exp(-min(max(z, -30.0), 30.0))))  # numpy's exp, as `score_with`


@dataclass(frozen=True, eq=False)
class EvidenceFeedback(Feedback):
    """A served batch's feedback for the learned rule: `conf` [n, R] holds the scores it was
    served with; beside them its features [n, R, F], the ramps' own confidences [n, R] (what an
    unfitted site scores), the scorer version that scored each input [n], and where each input
    was released and whether that answer agreed ([n] exit index, [n] bool)."""

    features: np.ndarray | None = None
    ramp_conf: np.ndarray | None = None
    scorer_version: np.ndarray | None = None
    exit_pos: np.ndarray | None = None
    released_agree: np.ndarray | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        n, R = self.conf.shape
        for name, shape in (("features", (n, R, F)), ("ramp_conf", (n, R)), ("scorer_version", (n,)),
                            ("exit_pos", (n,)), ("released_agree", (n,))):
            v = getattr(self, name)
            if v is None or np.shape(v) != shape:
                raise ValueError(f"{name} must have shape {shape}, got {None if v is None else np.shape(v)}")

    def released(self) -> tuple[np.ndarray, np.ndarray]:
        """Where each input was released, as served (the scores may have been re-scored since)."""
        return self.exit_pos, self.released_agree


def fit_logistic(X: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 12,
                 start: np.ndarray | None = None) -> np.ndarray:
    """Weights [F] of an L2-regularised logistic regression (the bias not penalised): Newton's
    method with a backtracking line search, from `start` when it fits better than zeros. The
    line search is what keeps a warm start safe: plain Newton steps from weights that saturate the
    sigmoid (a previous fit on other inputs) can overshoot without bound (a bias of 1e9 was seen
    on video, after which every score was 0 or 1). Deterministic; a separable or constant y gives
    finite weights through the L2."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    reg = np.full(X.shape[1], l2)
    reg[0] = 1e-6

    def objective(w: np.ndarray) -> float:
        z = X @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(reg * w * w))

    w = np.zeros(X.shape[1])
    f = objective(w)
    if start is not None and np.isfinite(start).all():
        f_start = objective(np.asarray(start, dtype=np.float64))
        if f_start < f:
            w, f = np.array(start, dtype=np.float64), f_start
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(X @ w, -30, 30)))
        g = X.T @ (p - y) + reg * w
        H = (X * (p * (1 - p))[:, None]).T @ X + np.diag(reg)
        step = np.linalg.solve(H, g)
        t, slope = 1.0, float(g @ step)
        while t > 1e-6:  # halve the step until the objective falls enough (Armijo)
            w_new = w - t * step
            f_new = objective(w_new)
            if f_new <= f - 1e-4 * t * slope:
                break
            t *= 0.5
        else:
            break  # no step lowers the objective: at the optimum, up to rounding
        w, f = w_new, f_new
        if np.abs(t * step).max() < 1e-6:
            break
    return w


def release_share(score: np.ndarray, ok: np.ndarray, loss: float) -> float:
    """Largest share of inputs released by a threshold on `score` (whole tie groups, highest
    first) with at most `loss` of all inputs released wrongly (`ok` False)."""
    n = score.size
    if n == 0:
        return 0.0
    order = np.argsort(-score, kind="stable")
    s, wrong = score[order], np.cumsum(~ok[order])
    ends = np.r_[np.flatnonzero(np.diff(s) != 0), n - 1]  # last position of each tie group
    fine = ends[wrong[ends] <= loss * n + 1e-9]
    return float(fine.max() + 1) / n if fine.size else 0.0


class EvidenceModel:
    """Per site: a ring of the latest inputs' features and agreement, the fitted weights, and the
    score of new inputs. Bounded: `size` inputs of [S, F] features, whatever the stream's length."""

    def __init__(self, num_sites: int, size: int, min_inputs: int = 256, train_inputs: int = 1024,
                 refit_every: int = 256, l2: float = 1.0, guard_gain: float | None = None,
                 guard_loss: float = 0.005):
        if size < 1 or min_inputs < 1 or train_inputs < 1 or refit_every < 1 or l2 < 0:
            raise ValueError("need size, min_inputs, train_inputs, refit_every >= 1 and l2 >= 0")
        S = num_sites
        self.num_sites, self.size = S, size
        self.min_inputs, self.train_inputs, self.refit_every, self.l2 = min_inputs, min(train_inputs, size), refit_every, l2
        self.guard_gain, self.guard_loss = guard_gain, guard_loss
        self.X = np.full((size, S, F), np.nan)
        self.agree = np.zeros((size, S), dtype=bool)
        self.written = 0
        self.weights: np.ndarray = np.full((S, F), np.nan)  # NaN row: unfitted, the score is the confidence
        self.version = 0
        self._since_fit = 0
        self.seen = np.zeros(S, dtype=np.int64)  # labelled inputs per site, ever
        self._seen_at_fit = np.zeros(S, dtype=np.int64)  # ... when the site was last fitted

    # ------------------------------------------------------------------ scoring
    def score(self, X: np.ndarray, sites: np.ndarray, conf: np.ndarray) -> np.ndarray:
        """[n, R] P(agree) at the given sites; a site not fitted yet scores its confidence."""
        return score_with(self.weights, X, sites, conf)

    def scorer(self) -> Scorer:
        """The current fit as an immutable value (a copy: later refits do not touch it)."""
        w = self.weights.copy()
        w.flags.writeable = False
        return Scorer(self.version, w)

    # ------------------------------------------------------------------ learning
    def add(self, sites: np.ndarray, X: np.ndarray, agree: np.ndarray) -> np.ndarray:
        """Keep a batch's features and agreement at the sites that ran; returns its ring rows."""
        n = X.shape[0]
        keep = min(n, self.size)
        rows = (self.written + n - keep + np.arange(keep)) % self.size
        self.X[rows] = np.nan
        self.agree[rows] = False
        self.X[rows[:, None], sites[None, :]] = X[n - keep:]
        self.agree[rows[:, None], sites[None, :]] = agree[n - keep:]
        self.written += n
        self._since_fit += n
        self.seen[sites] += n
        return rows

    def due(self) -> bool:
        """Time to refit: every `refit_every` inputs, and as soon as a site not fitted yet has
        its `min_inputs` (a ramp just added should not wait a whole period on its confidence)."""
        if self._since_fit >= self.refit_every:
            return True
        return bool(np.any((self.seen >= self.min_inputs) & (self._seen_at_fit < self.min_inputs)))

    def refit(self) -> bool:
        """Refit every site with enough labelled inputs on its latest `train_inputs`; True if
        any weights changed."""
        self._since_fit = 0
        m = min(self.written, self.size)
        order = (np.arange(self.written - m, self.written)) % self.size  # oldest first
        changed = False
        for s in range(self.num_sites):
            if self.seen[s] == self._seen_at_fit[s]:
                continue  # nothing new since its last fit (an inactive ramp): the same weights
            self._seen_at_fit[s] = self.seen[s]
            seen = order[~np.isnan(self.X[order, s, 0])]
            if seen.size < self.min_inputs:
                continue
            use = seen[-self.train_inputs:]
            X, y = self.X[use, s], self.agree[use, s]
            w = (fit_logistic(X, y.astype(np.float64), self.l2, start=self.weights[s])
                 if self._earns_its_place(X, y, self.weights[s]) else np.full(F, np.nan))
            if not np.array_equal(w, self.weights[s], equal_nan=True):
                self.weights[s] = w
                changed = True
        if changed:
            self.version += 1
        return changed

    def _earns_its_place(self, X: np.ndarray, y: np.ndarray, start: np.ndarray) -> bool:
        """The guard: fitted on the older three quarters of a site's inputs, does the learned score
        release at least `guard_gain` more of the newest quarter than the ramp's confidence does,
        within `guard_loss`? If not, the site keeps its confidence (no guard: always learned)."""
        if self.guard_gain is None:
            return True
        k = max(y.size // 4, 1)
        w = fit_logistic(X[:-k], y[:-k].astype(np.float64), self.l2, start=start)
        learned = release_share(X[-k:] @ w, y[-k:], self.guard_loss)  # ranks: the logit is enough
        plain = release_share(X[-k:, 1], y[-k:], self.guard_loss)  # feature 1: the confidence's logit
        return learned >= plain + self.guard_gain

    def rescored(self, rows: np.ndarray, conf: np.ndarray) -> np.ndarray:
        """The current model's scores for ring rows [m] over every site (NaN where a site did not
        run); `conf` [m, S] is what an unfitted site scores (its confidence)."""
        X = self.X[rows]  # [m, S, F]
        ran = ~np.isnan(X[..., 0])
        out = self.score(np.nan_to_num(X), np.arange(self.num_sites), np.nan_to_num(conf))
        return np.where(ran, out, np.nan)
