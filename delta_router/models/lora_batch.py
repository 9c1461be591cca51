"""Run a batch through the base with a different LoRA adapter on each group of rows.

Rows are grouped adapter-major (``G`` adapters x ``R`` rows each). While ``lora_hooks`` is active,
every target ``nn.Linear`` adds ``(x_g @ A_g^T) @ (scale_g * B_g)^T`` to the rows of group ``g``
in a forward hook. The base weights are never copied or modified: for a few hundred probe tokens
this costs a few % extra time, where folding ``W + scale * B @ A`` into a copy of every weight
costs a full read+write of the model per adapter (see benchmarks/RESULTS.md). The layouts are
the fastest measured on CPU: ``F.linear`` with ``A`` as stored (``[r, in]``), then ``addmm_``
with a contiguous ``(scale * B)^T`` (``[r, out]``); a loop over groups beat ``bmm``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from delta_router.models.finetunes import LoraFactors

# per target module, per group: (A [r, in], (scale * B)^T [r, out]), or None if not targeted
GroupFactors = list[tuple[torch.Tensor, torch.Tensor] | None]


@contextlib.contextmanager
def lora_hooks(model: torch.nn.Module, adapters: Sequence[LoraFactors]) -> Iterator[None]:
    """Inside the block, forward passes of ``model`` apply ``adapters[g]`` to row group ``g``."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name in sorted(set().union(*(a.factors for a in adapters))):
            weight = modules[name].weight
            per_group: GroupFactors = []
            for adapter in adapters:
                if name not in adapter.factors:
                    per_group.append(None)
                    continue
                a, b, scale = adapter.factors[name]
                per_group.append((a.to(weight).contiguous(), (b * scale).T.to(weight).contiguous()))
            handles.append(modules[name].register_forward_hook(_low_rank_hook(per_group)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _low_rank_hook(per_group: GroupFactors):
    groups = len(per_group)

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0].reshape(groups, -1, args[0].shape[-1])  # [G, rows*T, in]
        out = output.view(groups, -1, output.shape[-1])  # [G, rows*T, out], shares memory
        for g, factors in enumerate(per_group):
            if factors is not None:
                out[g].addmm_(F.linear(x[g], factors[0]), factors[1])
        return output

    return hook
