"""delta-router: search, select, merge and route a zoo of finetuned LLMs with Delta Activations.

Data path: probes -> activations -> deltas (``DeltaEmbedder``) -> index (``ModelIndex``) ->
selection (``TaskSelector``) -> merge (``Merger``). Finetunes come from ``LoraTrainer`` / ``Zoo``.
"""

import os

# Nothing loads from a model hub at run time unless the user opts in (HF_HUB_OFFLINE=0).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from delta_router.base import DEFAULT_BASE, BaseFingerprint, BaseModel, resolve_base  # noqa: E402
from delta_router.embed import DeltaEmbedder, Embedding, EmbeddingSpace  # noqa: E402
from delta_router.finetune import Finetune  # noqa: E402
from delta_router.index import ModelIndex, SearchHit  # noqa: E402
from delta_router.merge import Merger  # noqa: E402
from delta_router.probes import ProbeSet  # noqa: E402
from delta_router.route import QueryEncoder, Router  # noqa: E402
from delta_router.selector import TaskSelector  # noqa: E402
from delta_router.train import LoraTrainer, TrainConfig  # noqa: E402
from delta_router.zoo import Zoo  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "DEFAULT_BASE",
    "BaseFingerprint",
    "BaseModel",
    "DeltaEmbedder",
    "Embedding",
    "EmbeddingSpace",
    "Finetune",
    "LoraTrainer",
    "Merger",
    "ModelIndex",
    "ProbeSet",
    "QueryEncoder",
    "Router",
    "SearchHit",
    "TaskSelector",
    "TrainConfig",
    "Zoo",
    "resolve_base",
]
