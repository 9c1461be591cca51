"""``LoraHub``: a weighted combination of LoRA adapters whose weights are learnt from a few examples.

The composition of LoraHub (Huang et al., 2023), the protocol the Delta Activations paper uses for
its selection experiment: for every target module the *factors* are combined,
``A = sum_i w_i A_i`` and ``B = sum_i w_i scale_i B_i``, so the update is ``B @ A``. The weights
``w`` (one per adapter, in ``[-bound, bound]``) minimise the mean answer-token NLL on the examples
plus ``l1 * mean |w|``, found by a gradient-free search (Nelder-Mead, at most ``budget`` loss
evaluations). The search starts at ``w = 0`` (the base) with one simplex vertex per adapter at
weight 1, so it first sees every adapter alone.

Each loss evaluation is one no-grad pass over the examples; the composed factors are applied in
forward hooks (``lora_hooks``), so the base weights are never copied.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from scipy.optimize import minimize
from tqdm.auto import tqdm

from delta_router.data import Record
from delta_router.data.sequences import answer_logprobs, collate, encode
from delta_router.errors import MergeError
from delta_router.home import atomic_directory, atomic_write_text, refuse_existing
from delta_router.merging.merger import PROVENANCE_FILE
from delta_router.models.base import BaseLM, resolve_base
from delta_router.models.finetunes import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    Finetune,
    LoraFactors,
    load_lora_factors,
)
from delta_router.models.lora_batch import lora_hooks

logger = logging.getLogger(__name__)


class LoraHub:
    """``LoraHub(base, adapters).fit(records)`` -> ``weights_`` ([n] float); ``save(dir)`` -> adapter.

    Every adapter must be a plain LoRA adapter of ``base`` with the same target modules and rank.
    """

    def __init__(
        self,
        base: BaseLM | str,
        adapters: Sequence[str | Path | Finetune],
        budget: int = 40,
        l1: float = 0.05,
        bound: float = 1.5,
        max_length: int = 256,
        batch_size: int = 8,
        progress: bool = True,
    ):
        if not adapters:
            raise MergeError("LoraHub needs at least one adapter")
        self.base = resolve_base(base)
        self.budget, self.l1, self.bound = budget, l1, bound
        self.max_length, self.batch_size, self.progress = max_length, batch_size, progress
        self.finetunes = [a if isinstance(a, Finetune) else Finetune.open(a) for a in adapters]
        self.model = self.base.load_model()
        self.tokenizer = self.base.load_tokenizer()
        self.modules, self.a_stack, self.b_stack, self.scale = self._stack_factors()
        self.weights_: np.ndarray | None = None
        self.loss_: float | None = None

    def _stack_factors(self) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor], float]:
        """Per target module: A of every adapter [n, r, in], scale * B [n, out, r]; the first's scale."""
        loaded: list[LoraFactors] = []
        for ft in self.finetunes:
            if ft.kind != "lora":
                raise MergeError(f"{ft.path}: LoraHub combines LoRA adapters, not full models")
            factors = load_lora_factors(ft, self.model, self.base)
            if not factors.plain:
                raise MergeError(f"{ft.path}: uses more than plain LoRA (DoRA, saved modules, ...)")
            loaded.append(factors)

        def shapes(lora: LoraFactors) -> dict:
            return {m: (a.shape, b.shape) for m, (a, b, _) in lora.factors.items()}

        modules = sorted(loaded[0].factors)
        for ft, factors in zip(self.finetunes, loaded, strict=True):
            if shapes(factors) != shapes(loaded[0]):
                raise MergeError(
                    f"{ft.path}: its target modules or rank differ from {self.finetunes[0].path}; "
                    "LoraHub adds factors, so every adapter needs the same ones"
                )
        a_stack = [torch.stack([f.factors[m][0] for f in loaded]) for m in modules]
        b_stack = [torch.stack([f.factors[m][1] * f.factors[m][2] for f in loaded]) for m in modules]
        return modules, a_stack, b_stack, loaded[0].factors[modules[0]][2]

    def compose(self, weights: Sequence[float]) -> LoraFactors:
        """The combined adapter for ``weights`` ([n]); its scale is folded into B."""
        w = torch.as_tensor(np.asarray(weights), dtype=torch.float32)
        factors = {
            m: (torch.tensordot(w, a, dims=1), torch.tensordot(w, b, dims=1), 1.0)
            for m, a, b in zip(self.modules, self.a_stack, self.b_stack, strict=True)
        }
        return LoraFactors(factors, plain=True)

    @torch.no_grad()
    def loss(self, weights: Sequence[float], batches: list[dict[str, torch.Tensor]]) -> float:
        """Mean NLL per answer token (nats) of the composed model on ``batches``, plus the L1 term."""
        total, n_tokens = 0.0, 0
        with lora_hooks(self.model, [self.compose(weights)]):
            for batch in batches:
                logprobs = answer_logprobs(self.model, batch)[0]
                total -= float(logprobs.sum())
                n_tokens += logprobs.numel()
        return total / n_tokens + self.l1 * float(np.abs(weights).mean())

    def _batches(self, records: Sequence[Record]) -> list[dict[str, torch.Tensor]]:
        """``records`` (prompt -> answer) as collated batches, shortest first."""
        sequences = sorted(
            (encode(self.tokenizer, r.prompt(), r.output, self.max_length) for r in records),
            key=lambda s: len(s.ids),
        )
        size, pad_id = self.batch_size, self.tokenizer.pad_token_id
        return [collate(sequences[i : i + size], pad_id) for i in range(0, len(sequences), size)]

    def fit(self, records: Sequence[Record]) -> LoraHub:
        """Search the weights on ``records`` (their answers are the targets)."""
        if not records:
            raise ValueError("LoraHub needs at least one example")
        batches = self._batches(records)
        n = len(self.finetunes)
        simplex = np.vstack([np.zeros(n), np.eye(n)])
        bar = tqdm(total=self.budget, desc="lorahub", disable=not self.progress)

        def objective(w: np.ndarray) -> float:
            bar.update()
            return self.loss(w, batches)

        result = minimize(
            objective, simplex[0], method="Nelder-Mead", bounds=[(-self.bound, self.bound)] * n,
            options={"maxfev": self.budget, "initial_simplex": simplex},
        )  # fmt: skip
        bar.close()
        self.weights_, self.loss_ = np.asarray(result.x, dtype=float), float(result.fun)
        logger.info("lorahub weights %s, loss %.4f (%d evaluations)", self.weights_, self.loss_, result.nfev)
        return self

    def save(self, out_dir: str | Path, force: bool = False) -> Path:
        """Write the fitted combination as a PEFT LoRA adapter directory (atomically)."""
        if self.weights_ is None:
            raise MergeError("LoraHub.save before fit: no weights yet")
        out_dir = refuse_existing(out_dir, force)
        config = dict(self.finetunes[0].adapter_config)  # its scale applies to the saved B
        tensors = {}
        for module, (a, b, _) in self.compose(self.weights_).factors.items():
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (b / self.scale).contiguous()
        with atomic_directory(out_dir, force=force) as tmp:
            save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
            atomic_write_text(tmp / ADAPTER_CONFIG, json.dumps(config, indent=2))
            record = {
                "output": "adapter",
                "method": "lorahub",
                "base": {"name": self.base.name, "fingerprint": self.base.fingerprint.id},
                "models": [
                    {"model_id": ft.model_id, "path": str(ft.path), "weight": float(w)}
                    for ft, w in zip(self.finetunes, self.weights_, strict=True)
                ],
                "search": {"budget": self.budget, "l1": self.l1, "bound": self.bound, "loss": self.loss_},
            }
            atomic_write_text(tmp / PROVENANCE_FILE, json.dumps(record, indent=2))
        return out_dir
