"""Heads that keep learning: linear ramp heads retrained on the stream's own final answers, behind
a guard that only trusts inputs the candidate has not seen.

A ramp of kind `pool` or `mean` is a parameter-free reduction of the site's output (spatial or
token mean) followed by a linear head (W [K, D], b [K]). Given each input's reduced features,
a head can be retrained without the model: softmax regression, warm-started from the live head
and pulled towards it (L2), on a bounded buffer of the latest inputs whose final answers are
known.

The guard is prequential. A first version held out the newest quarter of the buffer and swapped
when the candidate beat the live head there; on the video camera day it swapped at every refit
and left the late sites releasing nothing at 1% loss (hindsight threshold): held-out frames next
to the training frames are nearly the same frames, so a head that has learned "the recent
answer" looks good on them and fails on what comes next. Here a candidate is trained at t, then
shadows the live head on the next `every` inputs (a linear head per site: a matrix product), and
goes live only if on those inputs, none of which it was trained on, a threshold on its
confidence releases at least `gain` more of them than the live head's within `loss`.

`SiteHeads` is the learner, fed the stream in order; `relearn` runs it over a recording (replay),
a server's control thread on the batches it serves (`policies.heads.LiveHeadsPolicy`). `core`
stays numpy-only: the server loads a new head into the model's ramp itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .evidence import release_share
from .settings import Settings


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def head_scores(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max-softmax confidence [N], class [N]) of a linear head on features x [N, D]."""
    logits = x.astype(np.float64) @ w.T + b
    return softmax(logits).max(axis=1), logits.argmax(axis=1)


def fit_head(w: np.ndarray, b: np.ndarray, x: np.ndarray, y: np.ndarray, *, l2: float = 0.01,
             lr: float = 0.01, steps: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression of y on x, warm-started at (w, b) and pulled towards it by `l2`, with
    Adam (full batch): the features' scales differ by orders of magnitude between sites, and
    Adam's per-weight steps need no tuning per site."""
    w0, b0 = np.asarray(w, np.float64), np.asarray(b, np.float64)
    w, b = w0.copy(), b0.copy()
    x = np.asarray(x, np.float64)
    onehot = np.eye(w.shape[0])[np.asarray(y, np.int64)]
    moments = [[np.zeros_like(w), np.zeros_like(w)], [np.zeros_like(b), np.zeros_like(b)]]
    for t in range(1, steps + 1):
        g = (softmax(x @ w.T + b) - onehot) / len(y)
        grads = (g.T @ x + l2 * (w - w0), g.sum(axis=0))
        for p, grad, (m, v) in zip((w, b), grads, moments):
            m *= 0.9
            m += 0.1 * grad
            v *= 0.999
            v += 0.001 * grad * grad
            p -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
    return w, b


@dataclass(frozen=True)
class HeadLearning:
    """How heads keep learning (the `head_*` settings)."""

    every: int = 256  # a candidate is trained, and the last one judged, every this many inputs
    buffer: int = 1024  # it is trained on at most this many of the latest inputs
    lag: int = 32  # inputs whose final answer is not known yet when a candidate is trained
    gain: float = 0.02  # a candidate goes live if it releases this share more of its shadow inputs ...
    loss: float = 0.01  # ... with a hindsight threshold at this loss
    l2: float = 0.01
    lr: float = 0.01
    steps: int = 150

    @classmethod
    def from_settings(cls, s: Settings) -> "HeadLearning":
        return cls(every=s.head_every, buffer=s.head_buffer, lag=s.head_lag, gain=s.head_gain,
                   loss=s.accuracy_constraint)

    def __post_init__(self) -> None:
        if self.every < 1 or self.buffer < 1 or self.lag < 0 or self.steps < 1:
            raise ValueError("head learning needs every, buffer, steps >= 1 and lag >= 0")
        if not (0 <= self.loss < 1 and self.l2 >= 0 and self.lr > 0):
            raise ValueError("head learning needs loss in [0, 1), l2 >= 0 and lr > 0")


@dataclass
class HeadsLog:
    """What head learning did per site: each new head that went live (the input index from which
    it answers, W, b), and each judgement's shadow release shares (live, candidate)."""

    live: list[list[tuple[int, np.ndarray, np.ndarray]]] = field(default_factory=list)
    judged: list[list[tuple[float, float]]] = field(default_factory=list)
    trained: list[list[int]] = field(default_factory=list)  # inputs each candidate was trained on

    @property
    def swaps(self) -> list[list[int]]:
        return [[at for at, _, _ in site] for site in self.live]


class SiteHeads:
    """One site's head that keeps learning, fed the stream in order (a server's control thread,
    or `relearn` over a recording).

    Every `every` inputs, with the final answers of all but the latest `lag` known: the candidate
    trained at the previous step is judged on the `every` inputs it shadowed since (none of which
    it was trained on) and goes live if a threshold on its confidence releases `gain` more of them
    than the live head's within `loss`; then a new candidate is trained on the latest `buffer`
    known inputs. Memory: the latest `buffer + every + lag` inputs' features."""

    def __init__(self, w: np.ndarray, b: np.ndarray, how: HeadLearning):
        self.w, self.b = np.asarray(w, np.float64), np.asarray(b, np.float64)
        self.how = how
        keep = how.buffer + how.every + how.lag
        self._x: np.ndarray | None = None  # ring of the latest `keep` inputs' features
        self._y = np.zeros(keep, np.int64)
        self._keep = keep
        self.seen = 0  # inputs observed
        self.cand: tuple[np.ndarray, np.ndarray] | None = None
        self.judged: list[tuple[float, float]] = []
        self.trained: list[int] = []
        self.live: list[tuple[int, np.ndarray, np.ndarray]] = []  # (input from which it answers, W, b)

    def answer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(confidence, class) of the live head on features x [n, D]."""
        return head_scores(x, self.w, self.b)

    def _rows(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        idx = np.arange(lo, hi) % self._keep
        assert self._x is not None
        return self._x[idx], self._y[idx]

    def observe(self, x: np.ndarray, final: np.ndarray) -> bool:
        """Inputs answered in order (features [n, D], the model's final answers [n]). True if a new
        head went live; it answers from the next input on."""
        x, final = np.asarray(x, np.float32), np.asarray(final, np.int64)
        if self._x is None:
            self._x = np.zeros((self._keep, x.shape[1]), np.float32)
        swapped = False
        for i in range(x.shape[0]):
            pos = self.seen % self._keep
            self._x[pos], self._y[pos] = x[i], final[i]
            self.seen += 1
            if self.seen % self.how.every == 0:
                swapped |= self._step()
        return swapped

    def _step(self) -> bool:
        how, t = self.how, self.seen
        known = t - how.lag
        swapped = False
        if self.cand is not None:  # trained a step ago on inputs before known - every: judge it on those since
            xs, ys = self._rows(max(0, known - how.every), known)
            live_c, live_p = head_scores(xs, self.w, self.b)
            new_c, new_p = head_scores(xs, *self.cand)
            shares = (release_share(live_c, live_p == ys, how.loss), release_share(new_c, new_p == ys, how.loss))
            self.judged.append(shares)
            if shares[1] >= shares[0] + how.gain:
                self.w, self.b = self.cand
                self.live.append((t, self.w, self.b))
                swapped = True
            self.cand = None
        if known >= how.every:  # enough answers for a candidate to shadow the next step
            lo = max(0, known - how.buffer)
            self.trained.append(known - lo)
            xs, ys = self._rows(lo, known)
            self.cand = fit_head(self.w, self.b, xs, ys, l2=how.l2, lr=how.lr, steps=how.steps)
        return swapped


def relearn(features: list[np.ndarray], heads: list[tuple[np.ndarray, np.ndarray]], final: np.ndarray,
            how: HeadLearning = HeadLearning()) -> tuple[np.ndarray, np.ndarray, HeadsLog]:
    """Each site's confidence and class on every input of a stream, as heads that keep learning
    would give them (`SiteHeads`, fed the stream in order): the answer to input i comes from the
    head live at i, trained only on inputs whose final answers were known before i (`lag` inputs
    earlier). Returns (conf [N, S], pred [N, S], log)."""
    final = np.asarray(final, np.int64)
    n, S = final.size, len(features)
    if len(heads) != S:
        raise ValueError(f"{len(heads)} heads for {S} sites")
    conf, pred = np.zeros((n, S), np.float32), np.zeros((n, S), np.int32)
    log = HeadsLog([[] for _ in range(S)], [[] for _ in range(S)], [[] for _ in range(S)])
    step = how.every
    for s in range(S):
        x = np.asarray(features[s], np.float32)
        if x.shape[0] != n:
            raise ValueError(f"site {s} has features for {x.shape[0]} inputs, not {n}")
        site = SiteHeads(*heads[s], how)
        for start in range(0, n, step):
            span = slice(start, min(start + step, n))
            conf[span, s], pred[span, s] = site.answer(x[span])
            if span.stop < n:  # (after the last input nothing is left to answer: no step)
                site.observe(x[span], final[span])
        log.live[s], log.judged[s], log.trained[s] = site.live, site.judged, site.trained
    return conf, pred, log
