"""Run a batch through the base with a different LoRA adapter on each group of rows.

Rows are grouped adapter-major (``G`` adapters x ``R`` rows each). While ``lora_hooks`` is active,
every target ``nn.Linear`` adds ``(x @ A_g^T) @ (scale_g * B_g)^T`` to the rows of group ``g`` in a
forward hook, with two batched matmuls. The base weights are never copied or modified: for a few
hundred probe tokens this costs ~2% extra FLOPs, where folding ``W + scale * B @ A`` into a copy
of every weight costs a full read+write of the model per adapter (see benchmarks/RESULTS.md).
Adapters with different ranks or target modules share a batch: factors are zero-padded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from delta_router.finetune import LoraFactors


@contextlib.contextmanager
def lora_hooks(model: torch.nn.Module, adapters: Sequence[LoraFactors]) -> Iterator[None]:
    """Inside the block, forward passes of ``model`` apply ``adapters[g]`` to row group ``g``."""
    modules = dict(model.named_modules())
    groups = len(adapters)
    handles = []
    try:
        for name in sorted(set().union(*(a.factors for a in adapters))):
            weight = modules[name].weight
            out_features, in_features = weight.shape
            rank = max(a.factors[name][0].shape[0] for a in adapters if name in a.factors)
            a_t = weight.new_zeros(groups, in_features, rank)  # A_g^T
            b_t = weight.new_zeros(groups, rank, out_features)  # (scale_g * B_g)^T
            for g, adapter in enumerate(adapters):
                if name in adapter.factors:
                    a, b, scale = adapter.factors[name]
                    a_t[g, :, : a.shape[0]] = a.T.to(weight)
                    b_t[g, : a.shape[0], :] = (b * scale).T.to(weight)
            handles.append(modules[name].register_forward_hook(_low_rank_hook(a_t, b_t)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _low_rank_hook(a_t: torch.Tensor, b_t: torch.Tensor):
    groups = a_t.shape[0]

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].reshape(groups, -1, a_t.shape[1])  # [G, rows*T, in]
        output.view(groups, -1, b_t.shape[2]).baddbmm_(torch.bmm(x, a_t), b_t)
        return output

    return hook
