"""Is a candidate better than the base on a handful of examples, beyond their noise?

Every candidate is scored on the same records as the base (``ExampleScores``), so the comparison is
paired: the per-record differences of ``utility`` (the gold choice's probability among the choices
for multiple choice, minus the answer NLL per token otherwise). ``Gain`` holds their mean and a
two-sided Student-t interval (for people), plus the one-sided lower bound the decision uses, at
``1 - (1 - confidence) / comparisons``: a Bonferroni correction, because the best of m noisy
candidates looks better than it is.

``choose`` decides with a prior, the candidate returned unless the examples say otherwise:

- ``default=None`` (prior: the base): keep the base unless some candidate's lower bound is above 0,
  then take the candidate with the highest lower bound.
- ``default=NAME`` (prior: the selection's merge): return ``NAME`` unless the examples show it hurts
  (its gain's one-sided upper bound at ``harm_confidence`` is below 0), or another candidate clearly
  beats the base (lower bound above 0) by more than ``NAME`` gains. When it hurts, the examples
  carry signal about the task but the prior is gone: a candidate that clearly beats the base is
  returned, else the one with the best mean gain if it is above 0, else the base.

Twenty examples rarely show a real gain beyond their noise (``reports/unseen``: a +6.5-point merge
looked -1.8 on its 20 examples), so the base prior gives up most of what selection finds; the
selection prior keeps it and still refuses a merge the examples show to hurt.
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
    sem: float  # standard error of the mean difference
    n: int

    @classmethod
    def paired(
        cls, candidate: np.ndarray, base: np.ndarray, confidence: float = 0.95, comparisons: int = 1
    ) -> Gain:
        diff = np.asarray(candidate, dtype=float) - np.asarray(base, dtype=float)
        interval = Interval.of(diff, confidence)
        n = len(diff)
        sem = float(np.std(diff, ddof=1) / np.sqrt(n)) if n > 1 else 0.0
        gain = cls(interval, 0.0, sem, n)
        return cls(interval, gain.one_sided(1.0 - (1.0 - confidence) / max(comparisons, 1)), sem, n)

    def one_sided(self, level: float, upper: bool = False) -> float:
        """The mean gain's one-sided bound at ``level`` (lower, or ``upper``)."""
        half = float(stats.t.ppf(level, self.n - 1)) * self.sem if self.sem > 0 else 0.0
        return self.interval.mean + half if upper else self.interval.mean - half

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

    def with_prior(self, default: str | None, harm_confidence: float = 0.8) -> Verdict:
        """The decision on the same scores under another prior (``choose``'s ``default``)."""
        rows = [(r.name, r.origin, r.scores, r.cross_validated) for r in self.results[1:]]
        return choose(self.results[0].scores, rows, self.confidence, default, harm_confidence)

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
    default: str | None = None,
    harm_confidence: float = 0.8,
) -> Verdict:
    """Compare ``candidates`` ((name, origin, scores, cross_validated)) with ``base`` on the same
    records and pick one (see the module docstring for ``default``)."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    gains: dict[str, Gain] = {}
    results = [CandidateResult(BASE_MODEL_NAME, "base", base, None)]
    for name, origin, scores, cv in candidates:
        if scores.n != base.n:
            raise ValueError(f"candidate {name!r} was scored on {scores.n} records, the base on {base.n}")
        gains[name] = Gain.paired(scores.utility, base.utility, confidence, comparisons=len(candidates))
        results.append(CandidateResult(name, origin, scores, gains[name], cv))
    if default is not None and default not in gains:
        raise ValueError(f"no candidate named {default!r}")
    n, level = base.n, f"{confidence:.0%} (Bonferroni over {len(candidates)} candidates)"
    clear = [name for name, gain in gains.items() if gain.bound > 0.0]
    best = max(clear, key=lambda name: gains[name].bound, default=None)
    top = max(gains, key=lambda name: gains[name].interval.mean, default=None)  # the best estimate

    def beats(name: str) -> str:
        g = gains[name]
        lower = f"lower bound {g.bound:+.3f} at {level}"
        return f"{name} beats the base on the {n} examples by {g.interval.mean:+.3f} ({lower})"

    def span(g: Gain) -> str:
        return f"{g.interval.mean:+.3f} (95% interval {g.interval.low:+.3f} to {g.interval.high:+.3f})"

    prefix = ""
    if default is not None:
        prior = gains[default]
        upper = prior.one_sided(harm_confidence, upper=True)
        if upper >= 0.0:
            if best is not None and best != default and gains[best].interval.mean > prior.interval.mean:
                return Verdict(best, beats(best), results, confidence)
            reason = (
                f"{default}, the selection's merge, is returned: on the {n} examples it gains {span(prior)}, "
                f"not shown to hurt (upper bound {upper:+.3f} at {harm_confidence:.0%})"
            )
            return Verdict(default, reason, results, confidence)
        prefix = f"{default}, the selection's merge, hurts on the examples (upper bound {upper:+.3f}); "
        if best is None and gains[top].interval.mean > 0.0:
            reason = f"{prefix}the best estimate of the rest, {top}, is returned: it gains {span(gains[top])}"
            return Verdict(top, reason, results, confidence)
    if best is not None:
        return Verdict(best, prefix + beats(best), results, confidence)
    reason = prefix + f"no candidate beats the base on the {n} examples at {level}"
    if top is not None:
        reason += f"; the best, {top}, gains {span(gains[top])}"
    return Verdict(BASE_MODEL_NAME, reason, results, confidence)
