"""Pooled feedback: batches served with the same configuration, given to the policy as one.

The control thread gives the policy every batch as served, and pools batches only while it has
fallen behind or when asked to (a cluster replica pools to its max batch; see
`ControlLoop._pool_feedback`); this is how a pool becomes one `Feedback` (or, for the learned exit
rule, one `EvidenceFeedback`; for heads that keep learning, one `HeadsFeedback`)."""

from __future__ import annotations

from typing import Any

import numpy as np

from apparate.core.controller import Feedback
from apparate.core.evidence import EvidenceFeedback

from .report import BatchReport


def merged_feedback(reports: list[BatchReport]) -> Feedback:
    """One Feedback for batches served with the same configuration (text lengths averaged; with
    early stop, the inputs that reached the final output, weighted: `BatchReport.known`); for
    the learned exit rule an `EvidenceFeedback` (features, scores and exits concatenated in
    arrival order, each input with the version of the scorer that served it)."""
    last = reports[-1]
    if last.features is not None:
        return _merged_evidence(reports)
    if last.pooled is not None:
        return _merged_heads(reports)
    if all(r.known is None and r.weight is None for r in reports):  # every input reached the end
        if len(reports) == 1:
            return Feedback(last.sites, last.thresholds, last.conf, last.agree, last.length)
        return Feedback(last.sites, last.thresholds, np.concatenate([r.conf for r in reports]),
                        np.concatenate([r.agree for r in reports]), _length(reports))
    # early stop: only the inputs that reached the final output, each with its inverse sampling
    # probability (1 for those that did not exit or were not sampled)
    weight = np.concatenate([r.known_rows(r.weight if r.weight is not None else np.ones(r.batch_size))
                             for r in reports])
    return Feedback(last.sites, last.thresholds, np.concatenate([r.known_rows(r.conf) for r in reports]),
                    np.concatenate([r.known_rows(r.agree) for r in reports]), _length(reports), weight=weight)


def _length(reports: list[BatchReport]) -> float | None:
    lengths = [(r.length, r.batch_size) for r in reports if r.length is not None]
    return sum(x * k for x, k in lengths) / sum(k for _, k in lengths) if lengths else None


def _merged_evidence(reports: list[BatchReport]) -> EvidenceFeedback:
    if any(r.features is None for r in reports):
        raise ValueError("a batch served without the learned rule's features among batches served with them")
    last = reports[-1]

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(r, name) for r in reports])

    version = np.concatenate([np.full(r.batch_size, r.scorer_version, dtype=np.int64) for r in reports])
    return EvidenceFeedback(last.sites, last.thresholds, cat("conf"), cat("agree"), _length(reports),
                            features=cat("features"), ramp_conf=cat("ramp_conf"), scorer_version=version,
                            exit_pos=cat("exit_pos"), released_agree=cat("released_agree"))


def _merged_heads(reports: list[BatchReport]) -> Any:
    from apparate.policies.heads import HeadsFeedback

    if any(r.pooled is None for r in reports):
        raise ValueError("a batch served without the heads' features among batches served with them")
    last = reports[-1]
    version = np.concatenate([np.full(r.batch_size, r.heads_version, dtype=np.int64) for r in reports])
    pooled = tuple(np.concatenate([r.pooled[j] for r in reports]) for j in range(len(last.sites)))
    return HeadsFeedback(last.sites, last.thresholds, np.concatenate([r.conf for r in reports]),
                         np.concatenate([r.agree for r in reports]), _length(reports), pooled=pooled,
                         final=np.concatenate([r.final for r in reports]), heads_version=version)
