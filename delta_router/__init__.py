"""delta-router: search, select, merge and route a zoo of finetuned LLMs with Delta Activations.

Data path: probes -> activations -> deltas (``DeltaEmbedder``) -> index (``ModelIndex``) ->
selection (``TaskSelector``) -> merge (``Merger``). Finetunes come from ``LoraTrainer`` / ``Zoo``.

The public names below are imported on first use, so ``import delta_router`` is cheap and sets
nothing: the CLI can configure the environment (offline mode) before torch and transformers load.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "DEFAULT_BASE": "delta_router.base",
    "BaseFingerprint": "delta_router.base",
    "BaseModel": "delta_router.base",
    "resolve_base": "delta_router.base",
    "DeltaEmbedder": "delta_router.embed",
    "Embedding": "delta_router.embed",
    "EmbeddingSpace": "delta_router.embed",
    "Finetune": "delta_router.finetune",
    "ModelIndex": "delta_router.index",
    "SearchHit": "delta_router.index",
    "Merger": "delta_router.merge",
    "ProbeSet": "delta_router.probes",
    "QueryEncoder": "delta_router.route",
    "Router": "delta_router.route",
    "TaskSelector": "delta_router.selector",
    "LoraTrainer": "delta_router.train",
    "TrainConfig": "delta_router.train",
    "Zoo": "delta_router.zoo",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'delta_router' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
