"""Candidate models of a task as weighted sums of finetune deltas, built in memory on a loaded base.

A ``Candidate`` is the base plus ``sum_i w_i * delta_i`` over finetunes: the base itself (no
members), one finetune (``w = 1``), or a linear merge. A LoRA adapter's delta is ``scale * B @ A``
per target module (adapters PEFT alone can read, e.g. DoRA, are folded by PEFT and diffed); a full
finetune's is its weights minus the base's. With weights summing to 1 this is exactly mergekit's
``linear`` merge of the finetunes (normalised ``task_arithmetic`` likewise); other weights are
``task_arithmetic`` without normalisation (``Candidate.recipe``). So ``build`` can score many merges
on the user's examples without writing any, then write the chosen one with mergekit.

``DeltaPatcher(model, base).patched(candidate)`` adds a candidate's sum to the weights of a loaded
base model in place for the duration of a ``with`` block, and restores them exactly afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from delta_router.merging.merger import MergeRecipe
from delta_router.models.base import BaseLM
from delta_router.models.finetunes import Finetune, fold_lora, iter_full_weights, load_lora_factors

Delta = dict[str, torch.Tensor]  # parameter name -> dense delta, the parameter's shape, float32


@dataclass(frozen=True)
class Candidate:
    """``name``: what a person reads ("top-3 linear, score-weighted"); ``members``: (finetune, weight).

    ``origin`` groups candidates: ``base``, ``single``, ``merge``, ``lorahub`` (weights learnt on the
    examples) or ``task-lora`` (the examples' own LoRA, alone or merged with neighbours). Those that
    learn from the examples are ``fitted``: their score on the examples is a cross-validated one.
    """

    name: str
    origin: str
    members: tuple[tuple[Finetune, float], ...] = ()
    details: dict = field(default_factory=dict, compare=False)

    @property
    def fitted(self) -> bool:
        return self.origin in ("lorahub", "task-lora")

    @property
    def weights(self) -> list[float]:
        return [w for _, w in self.members]

    def recipe(self) -> MergeRecipe:
        """The mergekit recipe that writes exactly this sum: ``linear`` for positive weights summing to
        1, else ``task_arithmetic`` without normalisation."""
        weights = self.weights
        if all(w > 0 for w in weights) and abs(sum(weights) - 1.0) < 1e-6:
            return MergeRecipe.load("linear")
        return MergeRecipe.load("task_arithmetic").with_parameters(normalize=False)

    def with_member(self, index: int, finetune: Finetune) -> Candidate:
        """This candidate with member ``index`` replaced (a cross-validation fold's own finetune)."""
        members = list(self.members)
        members[index] = (finetune, members[index][1])
        return Candidate(self.name, self.origin, tuple(members), self.details)


class DeltaPatcher:
    """Applies candidates to a loaded base ``model`` (float32, any device) in place, one at a time.

    Deltas are computed on demand from the finetunes (LoRA factors are small; a dense delta of every
    adapter would be a base-sized tensor set each), so memory stays at one base plus one sum.
    """

    def __init__(self, model: torch.nn.Module, base: BaseLM):
        self.model, self.base = model, base
        self.params = dict(model.named_parameters())

    def delta(self, finetune: Finetune) -> Delta:
        """The dense delta of one finetune: {parameter name: [shape of the parameter]}."""
        if finetune.kind == "full":
            return {
                name: tensor.to(torch.float32) - self.params[name].detach().cpu()
                for name, tensor in iter_full_weights(finetune, self.base)
                if name in self.params
            }
        factors = load_lora_factors(finetune, self.model, self.base)
        if not factors.plain:  # DoRA, saved modules, ...: PEFT knows how it folds
            folded = fold_lora(self.base.load_model(), finetune.path).state_dict()
            return {
                name: folded[name].to(torch.float32) - p.detach().cpu()
                for name, p in self.params.items()
                if name in folded and not torch.equal(folded[name], p.detach().cpu())
            }
        return {f"{module}.weight": scale * (b @ a) for module, (a, b, scale) in factors.factors.items()}

    def total(self, members: Sequence[tuple[Finetune, float]]) -> Delta:
        """``sum_i w_i * delta_i`` over ``members``."""
        total: Delta = {}
        for finetune, weight in members:
            for name, delta in self.delta(finetune).items():
                if name in total:
                    total[name].add_(delta, alpha=weight)
                else:
                    total[name] = delta.mul_(weight)
        return total

    @contextlib.contextmanager
    def patched(self, candidate: Candidate) -> Iterator[torch.nn.Module]:
        """``model`` with ``candidate``'s delta added to its weights inside the block, restored after."""
        total = self.total(candidate.members)
        saved = {}
        try:
            with torch.no_grad():
                for name, delta in total.items():
                    param = self.params[name]
                    saved[name] = param.detach().clone()
                    param.add_(delta.to(param))
            yield self.model
        finally:
            with torch.no_grad():
                for name, original in saved.items():
                    self.params[name].copy_(original)
