"""A live registry of served adapters: register and remove finetunes while the server runs.

``AdapterRegistry.register(path)`` checks a LoRA adapter against the base, embeds it (its Delta
Activation), profiles it for the router (from example queries when given, else from its profile
delta by a ``ProfileMap``: a data-free router's own reference map, or one fitted on the router's
models whose profiles came from examples), and
then, under the scheduler's lock, adds it to the index (committed to the index directory when there
is one), the router and the backend in one step: either all three change or none does. ``remove``
undoes that. Embedding and data-free profiling run outside the lock, so traffic keeps flowing while a
finetune is registered; the router's directory on disk is never rewritten (the registry lives in
the index).
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from delta_router.embedding.embedder import DeltaEmbedder, Embedding
from delta_router.embedding.vectors import unit_rows
from delta_router.errors import DataError, DuplicateModelError
from delta_router.model_ids import check_model_id
from delta_router.models.finetunes import Finetune
from delta_router.routing.data_free import (
    DEFAULT_PROFILE_DELTAS,
    ProfileMap,
    centred_profiles,
    delta_blocks,
    mapped_profiles,
    profile_deltas_of,
    profile_embedder,
)
from delta_router.search.index import ModelIndex

logger = logging.getLogger(__name__)

# (delta, profile) pairs a data-free registration fits its map on, at most: a seeded sample (the
# kernel is pairs x pairs; a hub-size router would not fit in memory)
MAX_MAP_PAIRS = 1024


class AdapterRegistry:
    """The served adapters of ``scheduler``'s backend, kept in step with ``index`` and the router."""

    def __init__(self, index: ModelIndex, scheduler, index_dir: str | Path | None = None):
        self.index, self.scheduler = index, scheduler
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self._embedder: DeltaEmbedder | None = None
        self._profile_embedders: dict[str, DeltaEmbedder] = {}  # by kind of profile deltas
        self._embedders_lock = threading.RLock()  # first registrations at once build one of each

    @property
    def embedder(self) -> DeltaEmbedder:
        with self._embedders_lock:
            if self._embedder is None:
                self._embedder = DeltaEmbedder.for_space(self.index.space, progress=False)
            return self._embedder

    def profile_deltas_embedder(self, kind: str) -> DeltaEmbedder:
        """The embedder of one kind of profile deltas (``routing.data_free.profile_embedder``), on the
        registry's copy of the base."""
        with self._embedders_lock:
            if kind not in self._profile_embedders:
                live = self.embedder.live  # one copy of the base for every embedder
                self._profile_embedders[kind] = profile_embedder(self.embedder.base, live=live, deltas=kind)
            return self._profile_embedders[kind]

    def describe(self, model_id: str) -> dict:
        """What ``/v1/models`` says of one served adapter."""
        entry = self.index.get(model_id)
        router = self.scheduler.router
        routed = router is not None and model_id in router.model_ids
        return {
            "base": self.index.space.base_name,
            "kind": entry.embedding.kind,
            "tags": entry.tags,
            "domain": entry.tags.get("domain"),
            "profile": router.sources[router.model_ids.index(model_id)] if routed else None,
        }

    def register(
        self,
        path: str | Path,
        model_id: str | None = None,
        tags: dict[str, str] | None = None,
        examples: Sequence[str] | None = None,
    ) -> dict:
        """Serve the LoRA adapter at ``path``; ``DeltaRouterError`` (nothing changed) when it cannot."""
        if examples is not None and self.scheduler.router is None:
            raise DataError("examples make a router profile, and this server has no router (serve --router)")
        finetune = Finetune.open(path, None if model_id is None else check_model_id(model_id))
        if finetune.kind != "lora":
            raise DataError(f"{path}: a full model; the server serves LoRA adapters of its base")
        self._refuse_taken(finetune.model_id)
        self.scheduler.backend.check_adapter(finetune.path)  # e.g. DoRA: not servable per row
        embedding = self.embedder.embed_one(finetune)  # refuses an adapter of another base
        router, backend = self.scheduler.router, self.scheduler.backend
        # forward passes outside the lock: traffic keeps flowing
        profile, cover, source = self._profile(embedding, examples) if router else (None,) * 3
        with self.scheduler.lock:
            self._refuse_taken(finetune.model_id)  # a concurrent registration of the same id
            self.index.add(embedding, tags=tags or {})
            try:
                if self.index_dir is not None:
                    self.index.save(self.index_dir)
            except Exception:
                self.index.remove(finetune.model_id)
                raise
            backend.add_adapter(finetune.model_id, finetune.path)
            if router is not None:
                router.add(finetune.model_id, profile, source, cover)
        logger.info("registered %s (%s profile)", finetune.model_id, source)
        return {"id": finetune.model_id, **self.describe(finetune.model_id)}

    def remove(self, model_id: str) -> None:
        """Stop serving ``model_id`` and take it out of the index and the router."""
        router, backend = self.scheduler.router, self.scheduler.backend
        with self.scheduler.lock:
            if model_id not in backend.model_ids():
                raise KeyError(model_id)
            if router is not None and model_id in router.model_ids:
                router.remove(model_id)
            backend.remove_adapter(model_id)
            if model_id in self.index:
                self.index.remove(model_id)
                if self.index_dir is not None:
                    self.index.save(self.index_dir)
        logger.info("removed %s", model_id)

    def _refuse_taken(self, model_id: str) -> None:
        if model_id in self.index or model_id in self.scheduler.backend.model_ids():
            raise DuplicateModelError(f"model id {model_id!r} is already served; DELETE it first")

    def _profile(
        self, embedding: Embedding, examples: Sequence[str] | None
    ) -> tuple[np.ndarray, np.ndarray | None, str]:
        """The router profile of a new adapter, what it covers of the router's background (see
        ``Router``), and how the profile was made. From ``examples`` (queries of its task) when given
        (it covers its profile); else data-free from its profile delta, by the router's own reference
        map when it was fitted data-free (``Router.reference``: the map ``fit_data_free`` used), else
        by a map fitted on the router's models whose profiles came from examples; centred on the
        map's predictions for the router's models and the new one as ``fit_data_free`` centres its
        profiles (what it covers: ``cover``, None for its profile)."""
        router = self.scheduler.router
        if examples:  # the encoder runs the serving model, which decode steps hook: hold the lock
            with self.scheduler.lock:
                features = self.scheduler.encoder(list(examples)).numpy()
            profile = unit_rows((features.mean(0) - router.center)[None])[0]
            return profile, None, "examples"
        with self.scheduler.lock:  # a consistent snapshot of the rows used; forward passes run outside
            reference = router.reference
            rows = [i for i, m in enumerate(router.model_ids) if m in self.index]
            from_examples = [i for i in rows if router.sources[i] == "examples"]
            if reference is None and len(from_examples) >= 2:
                rows = from_examples
            if len(rows) > MAX_MAP_PAIRS:
                rows = sorted(random.Random(0).sample(rows, MAX_MAP_PAIRS))
            known, profiles = [router.model_ids[i] for i in rows], router.profiles[rows]  # a copy
        if reference is None and len(known) < 2:
            raise DataError("a data-free profile needs >= 2 routed models to learn from: give examples")
        kind = DEFAULT_PROFILE_DELTAS if reference is None else reference.deltas_kind
        embeddings = [*(self.index.get(m).embedding for m in known), embedding]
        deltas = profile_deltas_of(embeddings, kind, self.profile_deltas_embedder)  # cached but the new one
        if reference is not None:  # as fit_data_free maps an index that holds it
            mapped, covers = mapped_profiles(reference, deltas, np.vstack([reference.deltas, deltas]))
            return mapped[-1], None if router.covers is router.profiles else covers[-1], "data-free"
        predicted = ProfileMap(blocks=delta_blocks(kind)).fit(deltas[:-1], profiles, deltas).predict(deltas)
        # it covers its profile; in a router saved with covers of its own (uncentred predictions,
        # before profiles covered themselves), its uncentred prediction
        cover = None if router.covers is router.profiles else predicted[-1]
        return centred_profiles(predicted)[-1], cover, "data-free"
