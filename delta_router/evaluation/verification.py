"""Is a candidate better than the base on a handful of examples, beyond their noise?

Every candidate is scored on the same records as the base (``ExampleScores``), so the comparison is
paired: the per-record differences of ``utility`` (the gold choice's probability among the choices
for multiple choice, minus the answer NLL per token otherwise). ``Gain`` holds their mean and a
two-sided Student-t interval (for people), plus the one-sided lower bound the decision uses, at
``1 - (1 - confidence) / comparisons``: a Bonferroni correction, because the best of m noisy
candidates looks better than it is. ``choose`` keeps the base unless some candidate's lower bound is
above 0, and then takes the candidate with the highest lower bound.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from delta_router.evaluation.scoring import ExampleScores
from delta_router.model_ids import BASE_MODEL_NAME
from delta_router.serialize import to_json


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided interval, in the units of the values (accuracy: a fraction)."""

    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: np.ndarray, confidence: float = 0.95) -> Interval:
        """Student-t interval of the mean of ``values`` ([n]); a point when n < 2 or they are all equal."""
        mean = float(np.mean(values))
        n = len(values)
        sem = float(np.std(values, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        if sem == 0.0:
            return cls(mean, mean, mean)
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sem
        return cls(mean, mean - half, mean + half)

    def to_dict(self) -> dict:
        return to_json(self)


@dataclass(frozen=True)
class Gain:
    """A candidate's paired gain over the base: ``interval`` of the mean difference of utility,
    ``bound`` the corrected one-sided lower bound (see the module docstring)."""

    interval: Interval
    bound: float

    @classmethod
    def paired(
        cls, candidate: np.ndarray, base: np.ndarray, confidence: float = 0.95, comparisons: int = 1
    ) -> Gain:
        diff = np.asarray(candidate, dtype=float) - np.asarray(base, dtype=float)
        interval = Interval.of(diff, confidence)
        n, alpha = len(diff), (1.0 - confidence) / max(comparisons, 1)
        sem = float(np.std(diff, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        bound = interval.mean - (float(stats.t.ppf(1.0 - alpha, n - 1)) * sem if sem > 0 else 0.0)
        return cls(interval, bound)

    def to_dict(self) -> dict:
        return to_json(self)


@dataclass(frozen=True)
class CandidateResult:
    """One candidate's scores on the examples (cross-validated if it learnt from them)."""

    name: str
    origin: str
    scores: ExampleScores
    gain: Gain | None  # None for the base itself
    cross_validated: bool = False

    @property
    def accuracy(self) -> Interval | None:
        if self.scores.correct is None:
            return None
        return Interval.of(self.scores.correct.astype(float))

    def to_dict(self) -> dict:
        accuracy = self.accuracy
        return {
            "name": self.name,
            "origin": self.origin,
            "cross_validated": self.cross_validated,
            "n": self.scores.n,
            "utility": float(self.scores.utility.mean()),
            "accuracy": accuracy.to_dict() if accuracy else None,
            "score": self.scores.summary().to_dict(),
            "gain_over_base": self.gain.to_dict() if self.gain else None,
        }


@dataclass(frozen=True)
class Verdict:
    """The chosen candidate (``BASE_MODEL_NAME`` when nothing beat the base) and why."""

    chosen: str
    reason: str
    results: list[CandidateResult]
    confidence: float

    @property
    def kept_base(self) -> bool:
        return self.chosen == BASE_MODEL_NAME

    def result(self, name: str) -> CandidateResult:
        return next(r for r in self.results if r.name == name)

    def to_dict(self) -> dict:
        return {
            "chosen": self.chosen,
            "reason": self.reason,
            "confidence": self.confidence,
            "utility": "gold-choice probability" if self.results[0].scores.gold_prob is not None else "-nll",
            "candidates": [r.to_dict() for r in self.results],
        }


def choose(
    base: ExampleScores,
    candidates: Sequence[tuple[str, str, ExampleScores, bool]],
    confidence: float = 0.95,
) -> Verdict:
    """Compare ``candidates`` ((name, origin, scores, cross_validated)) with ``base`` on the same records."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    results = [CandidateResult(BASE_MODEL_NAME, "base", base, None)]
    for name, origin, scores, cv in candidates:
        if scores.n != base.n:
            raise ValueError(f"candidate {name!r} was scored on {scores.n} records, the base on {base.n}")
        gain = Gain.paired(scores.utility, base.utility, confidence, comparisons=len(candidates))
        results.append(CandidateResult(name, origin, scores, gain, cv))
    scored = [r for r in results if r.gain is not None]
    best = max(scored, key=lambda r: r.gain.bound, default=None)  # type: ignore[union-attr]
    level = f"{confidence:.0%} (Bonferroni over {len(candidates)} candidates)"
    if best is None or best.gain is None or best.gain.bound <= 0.0:
        top = max(scored, key=lambda r: r.gain.interval.mean, default=None)  # type: ignore[union-attr]
        reason = f"no candidate beats the base on the {base.n} examples at {level}"
        if top is not None and top.gain is not None:
            g = top.gain.interval
            reason += (
                f"; the best, {top.name}, gains {g.mean:+.3f} (95% interval {g.low:+.3f} to {g.high:+.3f})"
            )
        return Verdict(BASE_MODEL_NAME, reason, results, confidence)
    g = best.gain.interval
    reason = (
        f"{best.name} beats the base on the {base.n} examples by {g.mean:+.3f} "
        f"(lower bound {best.gain.bound:+.3f} at {level})"
    )
    return Verdict(best.name, reason, results, confidence)
