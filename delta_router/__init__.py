"""delta-router: search, select, merge and route a zoo of finetuned LLMs with Delta Activations.

Data path: probes -> activations -> deltas (``DeltaEmbedder``) -> index (``ModelIndex``) ->
selection (``TaskSelector``) -> merge (``Merger``). Finetunes come from ``LoraTrainer`` / ``Zoo``.

The public names below are imported on first use, so ``import delta_router`` is cheap and sets
nothing: the CLI can configure the environment (offline mode) before torch and transformers load.
"""

from __future__ import annotations

import importlib
import warnings

__version__ = "0.1.0"

_EXPORTS = {
    "DEFAULT_BASE": "delta_router.models.base",
    "BaseFingerprint": "delta_router.models.base",
    "BaseLM": "delta_router.models.base",
    "BaseModel": "delta_router.models.base",  # deprecated alias of BaseLM (warns)
    "resolve_base": "delta_router.models.base",
    "DeltaEmbedder": "delta_router.embedding.embedder",
    "Embedding": "delta_router.embedding.embedder",
    "EmbeddingSpace": "delta_router.embedding.embedder",
    "Finetune": "delta_router.models.finetunes",
    "ModelIndex": "delta_router.search.index",
    "SearchHit": "delta_router.search.index",
    "Merger": "delta_router.merging.merger",
    "ProbeSet": "delta_router.embedding.probes",
    "QueryEncoder": "delta_router.routing.router",
    "Router": "delta_router.routing.router",
    "TaskSelector": "delta_router.search.selector",
    "LoraTrainer": "delta_router.training.trainer",
    "TrainConfig": "delta_router.training.trainer",
    "Zoo": "delta_router.zoo.zoo",
}
_DEPRECATED = {"BaseModel": "BaseLM"}  # old public name -> its new name
__all__ = sorted(set(_EXPORTS) - set(_DEPRECATED))


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'delta_router' has no attribute {name!r}")
    if name in _DEPRECATED:
        warnings.warn(
            f"delta_router.{name} is deprecated: use {_DEPRECATED[name]}", DeprecationWarning, stacklevel=2
        )
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
