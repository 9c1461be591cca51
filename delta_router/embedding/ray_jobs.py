"""Embedding a manifest on Ray Data: chunks of finetunes spread over an actor pool.

``ray_runner(space, address)`` is a ``manifest.ChunkRunner``: each chunk (its finetunes' paths and
ids, as JSON) is one row of a Ray dataset, mapped by ``map_batches`` over a pool of ``workers``
actors that each hold one ``DeltaEmbedder`` of the index's embedding space (the base loaded once per
actor, ``num_gpus`` per actor on a GPU cluster). Results stream back as chunks finish, so the
manifest job adds and commits them to the index as it does in process.

On one machine Ray starts locally (``address=None``). Each actor asks for ``cpus_per_worker``
CPUs, a fraction by default: an actor pool that takes every CPU of ``ray.init(num_cpus=2)`` starves
Ray's own read tasks and hangs (measured here), so the pool leaves room for them. ``ray`` is an
optional dependency (``pip install 'delta-router[ray]'``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence

import numpy as np

from delta_router.embedding.embedder import DeltaEmbedder, Embedding, EmbeddingSpace
from delta_router.embedding.manifest import ChunkResults, ChunkRunner, embed_chunk
from delta_router.errors import DeltaRouterError
from delta_router.models.finetunes import Finetune

# the environment every actor needs: the cache home and the offline switches
FORWARDED_ENV = ("DELTA_ROUTER_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


class ChunkEmbedder:
    """A Ray actor: one ``DeltaEmbedder`` of ``space``; a batch of JSON chunks -> JSON results."""

    def __init__(self, space: dict, threads: int = 1):
        import torch

        torch.set_num_threads(threads)
        self.embedder = DeltaEmbedder.for_space(EmbeddingSpace.from_dict(space), progress=False)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        results = []
        for chunk in batch["chunk"]:
            opened: list[Finetune | str] = []
            for path, model_id in json.loads(chunk):
                try:
                    opened.append(Finetune.open(path, model_id))
                except DeltaRouterError as exc:  # the driver opened it, but a worker may see other files
                    opened.append(str(exc))
            embedded = iter(embed_chunk(self.embedder, [ft for ft in opened if not isinstance(ft, str)]))
            outcomes = [ft if isinstance(ft, str) else next(embedded) for ft in opened]
            results.append(json.dumps([o.to_dict() if isinstance(o, Embedding) else o for o in outcomes]))
        return {"number": list(batch["number"]), "results": results}


def ray_runner(
    space: EmbeddingSpace,
    address: str | None = None,
    workers: int = 2,
    cpus_per_worker: float = 0.5,
    gpus_per_worker: float = 0.0,
) -> ChunkRunner:
    """A ``ChunkRunner`` on Ray: ``address`` of a cluster, or None to start Ray on this machine."""
    try:
        import ray
    except ImportError as exc:
        raise DeltaRouterError("--ray needs Ray: pip install 'delta-router[ray]'") from exc

    def run(chunks: Sequence[Sequence[Finetune]]) -> Iterator[tuple[int, ChunkResults]]:
        if not chunks:
            return
        env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
        if not ray.is_initialized():
            options = {"num_cpus": os.cpu_count()} if address is None else {"address": address}
            ray.init(**options, runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False)
        rows = [
            {"number": n, "chunk": json.dumps([[str(ft.path), ft.model_id] for ft in chunk])}
            for n, chunk in enumerate(chunks)
        ]
        dataset = ray.data.from_items(rows).map_batches(
            ChunkEmbedder, fn_constructor_kwargs={"space": space.to_dict()}, batch_size=1,
            concurrency=min(workers, len(chunks)), num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
        )  # fmt: skip
        for row in dataset.iter_rows():
            outcomes = [_outcome(o) for o in json.loads(row["results"])]
            yield int(row["number"]), outcomes

    return run


def _outcome(data: dict | str) -> Embedding | str:
    if isinstance(data, str):
        return data
    return Embedding.from_dict(data, vector=np.asarray(data.pop("vector"), dtype=np.float32))
