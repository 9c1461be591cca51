"""Data-free router profiles: a finetune's Delta Activation mapped into the router's query space.

A public finetune ships without its training data, so ``Router.fit`` has no prompts to profile it
from. Its Delta Activation and its data-based profile are both final-layer states of the same
base, and across finetunes whose data we do have (a *reference* zoo) the two geometries correspond:
``ProfileMap``, a kernel ridge regression from unit, centred deltas to profiles fitted on the
reference pairs, predicts a profile for any finetune from its delta alone (no data). Queries are
centred as the reference router centres them.

The deltas the map reads are not the index's (the paper's 5 Alpaca probes) but ``profile_embedder``'s:
by default (``"formats"``) the paper's probes in each of the three prompt formats (``ProbeSet.formats``),
each probe's shift unit-normed before the mean. On finetunes trained in mixed prompt formats the
index's deltas follow the format, these the domain. Chosen on dev queries (records no benchmark
routes) by the lowest of four ratios to the data-based router: leave one domain out on ``full`` and
on ``wild``, and each zoo mapped by the other (as ``route fit --data-free`` maps a pool by a
reference zoo). ``"formats"`` 90.1% against ``"plain"`` (the paper's preambles with 3 generic tasks
in no template, ``ProbeSet.plain``) 78.7%; on test 87.4% against 84.7%: wild mapped by full routes
81.4% of its test queries right (plain 78.9%), leave one domain out wild 86.8% (90.4%), full 93.9%
(93.6%). It costs one forward pass of 15 probes per finetune, cached like any embedding; for an
index too large for that, ``deltas="index"`` maps the index's own vectors (no forward pass; as good
on finetunes that share one prompt format).

The predicted profiles are blends of reference profiles that share a direction; ``fit_data_free``
centres them on their mean (``centred_profiles``), as data-based profiles are centred: with the plain
deltas, full 93.6% routed right, wild 90.4%, and on full 72% of an unseen domain's queries fall back
to the base at 4.8 points of in-zoo accuracy (87.9%, 86.8% and 54% uncentred).

A data-free router also keeps its reference's profiles as its ``Background``: a query that matches a
reference task no indexed model covers goes to the base. The threshold alone cannot see that a task
is missing (a query of it still lands near some mis-predicted profile); the reference, whose
profiles come from data, can. Mapped across zoos, it sends far more of an unseen domain's queries to
the base at no more in-zoo accuracy lost (RESULTS.md, "Background tasks").

Measured leave-one-domain-out (the map is fitted without the domain it predicts): see
``benchmarks/route_accuracy.py`` and benchmarks/RESULTS.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from delta_router.embedding.embedder import DeltaEmbedder, Embedding, LiveModel
from delta_router.embedding.probes import ProbeSet
from delta_router.embedding.vectors import unit_rows
from delta_router.errors import DataError
from delta_router.home import cache_dir
from delta_router.models.base import BaseLM, resolve_base
from delta_router.routing.router import Background, QueryEncoder, ReferencePairs, Router, zoo_examples
from delta_router.search.index import ModelIndex

logger = logging.getLogger(__name__)

DEFAULT_ALPHA = 0.01  # ridge strength, from a leave-one-domain-out sweep on the full zoo (RESULTS.md)
# The fallback threshold of a data-free router: of the thresholds that cost <= 5 points of in-zoo
# accuracy, the one that sends the most of a withheld domain's queries to the base, on dev queries of
# the full zoo (67% for 4.2 points; RESULTS.md, "Format-spanning deltas again").
DATA_FREE_THRESHOLD = 0.40
# What a ProfileMap reads of each finetune: "formats" or "plain", ``profile_embedder``'s deltas on
# ``ProbeSet.formats`` or ``ProbeSet.plain`` (a forward pass of 15 probes per finetune, cached), or
# "index", the vectors already in the index (free at any scale).
PROFILE_DELTAS = ("formats", "plain", "index")
DEFAULT_PROFILE_DELTAS = "formats"


@dataclass
class ProfileMap:
    """Kernel ridge from Delta Activations ``[n, d]`` to unit router profiles ``[n, d]``.

    ``predict(x) = unit(k(x) (K + alpha I)^-1 P)`` with the linear kernel of unit deltas centred on
    the mean of ``population``: a combination of the reference profiles, weighted by how the
    finetune's delta relates to the reference deltas. The population is every delta in play, the
    reference's and the ones to profile (their vectors are known; no data is): centred on the
    reference alone, deltas of a domain the reference lacks carry that domain's whole offset, and
    leave-one-domain-out routing on the full zoo falls from 88.6% to 3.9% (below random).
    """

    alpha: float = DEFAULT_ALPHA

    def fit(
        self, deltas: np.ndarray, profiles: np.ndarray, population: np.ndarray | None = None
    ) -> ProfileMap:
        if len(deltas) != len(profiles) or len(deltas) < 2:
            raise DataError(
                f"a profile map needs >= 2 (delta, profile) pairs, got {len(deltas)} / {len(profiles)}"
            )
        deltas = np.asarray(deltas, dtype=np.float64)
        self.mean_ = np.asarray(deltas if population is None else population, dtype=np.float64).mean(0)
        self.reference_ = self._unit(deltas)
        kernel = self.reference_ @ self.reference_.T
        self.coef_ = np.linalg.solve(
            kernel + self.alpha * np.eye(len(kernel)), np.asarray(profiles, np.float64)
        )
        return self

    def predict(self, deltas: np.ndarray) -> np.ndarray:
        """Unit profiles ``[m, d]`` (float32) of finetunes with Delta Activations ``deltas`` ``[m, d]``."""
        predicted = self._unit(np.asarray(deltas, dtype=np.float64)) @ self.reference_.T @ self.coef_
        return unit_rows(predicted.astype(np.float32))

    def _unit(self, deltas: np.ndarray) -> np.ndarray:
        centred = deltas - self.mean_
        return centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-12)


def profile_embedder(
    base: str | BaseLM,
    progress: bool = False,
    live: LiveModel | None = None,
    deltas: str = DEFAULT_PROFILE_DELTAS,
) -> DeltaEmbedder:
    """The embedder of the deltas a ``ProfileMap`` reads (``[n, hidden]``): 15 probes (``deltas``
    "plain": ``ProbeSet.plain``; "formats": the paper's 5 in each of the 3 prompt formats), each
    probe's shift unit-normed before the mean. ``live``: another embedder's live model of this base,
    to share instead of loading the base again."""
    base = resolve_base(base)
    probes = ProbeSet.plain() if deltas == "plain" else ProbeSet.formats(tokenizer=base.load_tokenizer())
    return DeltaEmbedder(base, probes, normalize="probe", progress=progress, live=live)


def profile_deltas(
    index: ModelIndex,
    model_ids: list[str],
    deltas: str = DEFAULT_PROFILE_DELTAS,
    base: str | BaseLM | None = None,
    progress: bool = False,
) -> np.ndarray:
    """What a ``ProfileMap`` reads of each of ``model_ids``: ``[n, hidden]`` float32, the ``deltas``
    of ``PROFILE_DELTAS`` (``base``: the index's, already loaded, to skip loading it again)."""
    embeddings = [index.get(m).embedding for m in model_ids]
    base = base or index.space.base_name
    return profile_deltas_of(embeddings, deltas, lambda kind: profile_embedder(base, progress, deltas=kind))


def profile_deltas_of(
    embeddings: Sequence[Embedding], deltas: str, embedder_of: Callable[[str], DeltaEmbedder]
) -> np.ndarray:
    """``profile_deltas`` of embedded finetunes, indexed or not: ``[n, hidden]`` float32; "index" reads
    their vectors, any other kind runs ``embedder_of(deltas)`` on their files (cached)."""
    if deltas not in PROFILE_DELTAS:
        raise DataError(f"unknown profile deltas {deltas!r}; choose from {', '.join(PROFILE_DELTAS)}")
    if deltas == "index":
        return np.stack([e.vector for e in embeddings]).astype(np.float32)
    return embedder_of(deltas).transform([e.path for e in embeddings])


def reference_pairs(
    zoos, encoder: QueryEncoder, deltas: str = DEFAULT_PROFILE_DELTAS, progress: bool = False
) -> tuple[np.ndarray, Router]:
    """The reference of one built zoo or several (of one base and probe set): their domain finetunes'
    ``profile_deltas`` ``[n, d]`` and one data-based ``Router`` over all of them, from their training
    prompts (ids ``<zoo>_<member>`` when several, zoos in name order); both cached under the home.

    The map carries a domain over only for recipes its reference has seen: wild's finetunes, mapped
    by ``full`` alone, route 81.4% of wild's test queries right; by ``full`` + wild's finetunes of
    the other domains, 88.9% (RESULTS.md, "Format-spanning deltas again")."""
    zoos = sorted(zoos, key=lambda zoo: zoo.spec.name) if isinstance(zoos, list | tuple) else [zoos]
    if not zoos:
        raise DataError("a reference needs at least one built zoo")
    indexes = [zoo.load_index() for zoo in zoos]
    for zoo, index in zip(zoos[1:], indexes[1:], strict=True):
        index.space.check_same(indexes[0].space, f"the zoo {zoo.spec.name}", f"the zoo {zoos[0].spec.name}")
    space = {k: v for k, v in indexes[0].space.to_dict().items() if k != "probe_texts"}  # fingerprinted
    names = zoos[0].spec.name if len(zoos) == 1 else [zoo.spec.name for zoo in zoos]
    key = json.dumps([names, space, encoder.layer, encoder.pooling, encoder.max_length])
    directory = cache_dir("references") / hashlib.sha256(key.encode()).hexdigest()[:16]
    prefixes = [f"{zoo.spec.name}_" if len(zoos) > 1 else "" for zoo in zoos]
    members = [[m.id for m in zoo.spec.members() if m.kind == "domain"] for zoo in zoos]  # the router's rows
    if (directory / "router.json").exists():
        router = Router.load(directory)
        if router.model_ids != [p + m for p, ids in zip(prefixes, members, strict=True) for m in ids]:
            raise DataError(f"the cached reference router {directory} does not match its zoos: remove it")
    else:
        examples = [zoo_examples(zoo) for zoo in zoos]
        prompts = {p + m: t for p, ex in zip(prefixes, examples, strict=True) for m, t in ex.items()}
        base = zoos[0].base
        router = Router.fit(encoder, base.fingerprint, prompts, progress, base_name=base.name)
        router.save(directory, force=True)
    vectors = [
        profile_deltas(index, ids, deltas, zoo.base, progress)
        for zoo, index, ids in zip(zoos, indexes, members, strict=True)
    ]
    return np.vstack(vectors), router


def fit_data_free(
    index: ModelIndex,
    reference_deltas: np.ndarray,
    reference: Router,
    alpha: float = DEFAULT_ALPHA,
    deltas: str = DEFAULT_PROFILE_DELTAS,
    progress: bool = False,
    background: bool = True,
    **options,
) -> Router:
    """A ``Router`` over every model of ``index``, profiled from its ``profile_deltas`` (of the same
    kind as ``reference_deltas``) by a ``ProfileMap`` fitted on the reference pairs; queries centred
    like the reference router's. With ``background``, the reference's profiles are its ``Background``:
    a query of a reference task that no indexed model covers goes to the base. The router keeps the
    reference pairs, so a model registered later is mapped the same way."""
    if index.space is None or len(index) == 0:
        raise DataError("the index is empty: add finetunes before fitting a router")
    reference.check_base(index.space.base, "the index's base")
    if len(reference_deltas) != len(reference.model_ids):
        raise DataError(f"{len(reference_deltas)} reference deltas for {len(reference.model_ids)} profiles")
    ids = index.model_ids()
    vectors = profile_deltas(index, ids, deltas, progress=progress)
    population = np.vstack([reference_deltas, vectors])
    mapping = ProfileMap(alpha).fit(reference_deltas, reference.profiles, population)
    predicted = mapping.predict(vectors)
    settings = {"layer": reference.layer, "pooling": reference.pooling, "max_length": reference.max_length}
    logger.info("data-free profiles: %d models, %s deltas, %d pairs", len(ids), deltas, len(reference_deltas))
    options.setdefault("threshold", DATA_FREE_THRESHOLD)
    return Router(
        ids, centred_profiles(predicted), reference.center, reference.base_fingerprint, **settings,
        base_name=reference.base_name, sources=["data-free"] * len(ids),
        background=Background(reference.profiles) if background else None, covers=predicted,
        reference=ReferencePairs(reference_deltas, reference.profiles, deltas, alpha), **options,
    )  # fmt: skip


def centred_profiles(predicted: np.ndarray) -> np.ndarray:
    """Data-free profiles ``[n, d]`` centred on their mean and unit (``[n, d]`` float32), as a data-based
    router's are (``Router.fit``: each model's mean query minus the mean over models). Every predicted
    profile is a blend of reference profiles, and the blends share a direction that raises every
    model's cosine to every query alike; without it the right model stands out. Leave one domain out
    on the full zoo: 87.9% routed right -> 93.6%, and the abstention curve improves (RESULTS.md).
    Fewer than 2 profiles are returned as they are."""
    predicted = np.asarray(predicted, dtype=np.float32)
    return predicted if len(predicted) < 2 else unit_rows(predicted - predicted.mean(0))


def leave_one_group_out(
    deltas: np.ndarray, profiles: np.ndarray, groups: list[str], alpha: float = DEFAULT_ALPHA
) -> np.ndarray:
    """Each finetune's profile predicted by a map fitted without its group (e.g. its domain): how the
    data-free router does on finetunes of a kind the reference never held. ``[n, d]`` float32."""
    groups_arr = np.asarray(groups)
    predicted = np.zeros(np.shape(profiles), dtype=np.float32)
    for group in sorted(set(groups)):
        held = groups_arr == group
        mapping = ProfileMap(alpha).fit(deltas[~held], profiles[~held], population=deltas)
        predicted[held] = mapping.predict(deltas[held])
    return predicted
