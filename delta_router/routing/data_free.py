"""Data-free router profiles: a finetune's Delta Activation mapped into the router's query space.

A public finetune ships without its training data, so ``Router.fit`` has no prompts to profile it
from. Its Delta Activation and its data-based profile are both final-layer states of the same
base, and across finetunes whose data we do have (a *reference* zoo) the two geometries correspond:
``ProfileMap``, a kernel ridge regression from centred, whitened, unit deltas to profiles fitted on
the reference pairs, predicts a profile for any finetune from its delta alone (no data). Queries
are centred as the reference router centres them.

The deltas the map reads are not the index's (the paper's 5 Alpaca probes) but ``profile_embedder``'s,
each probe's shift unit-normed before the mean: ``"formats"``, the paper's probes in each of the three
prompt formats (``ProbeSet.formats``), and ``"plain"``, the paper's preambles with 3 generic tasks in
no template (``ProbeSet.plain``). On finetunes trained in mixed prompt formats the index's deltas
follow the format, these the domain. The default, ``"formats+plain"``, maps each kind by its own ridge
and averages the two predictions: ``"formats"`` carries a pool across zoos better, ``"plain"`` leave
one domain out, and their errors differ. Chosen on dev queries (records no benchmark routes) by the
lowest of four ratios to the data-based router (leave one domain out on ``full`` and on ``wild``, and
each zoo mapped by the other, as ``route fit --data-free`` maps a pool by a reference zoo), where it
ties ``"formats"`` (90.1%) and beats it in the other three, then confirmed on a fresh set of test
records (91.0% against 88.4%). Whitened (``ProfileMap``), on the benchmark's test queries of the
rebuilt wild zoo, wild mapped by full routes 88.6% right, 95% of the data-based router (84.6%
unwhitened); leave one domain out wild 90.4% (83.2%), full 94.6% (94.6%). It costs two forward
passes of 15 probes per finetune, cached like any embedding;
for an index too large for that, ``deltas="index"`` maps the index's own vectors (no forward pass; as
good on finetunes that share one prompt format).

The predicted profiles are blends of reference profiles that share a direction; ``fit_data_free``
centres them on their mean (``centred_profiles``), as data-based profiles are centred: with the plain
deltas, full 93.6% routed right, wild 90.4%, and on full 72% of an unseen domain's queries fall back
to the base at 4.8 points of in-zoo accuracy (87.9%, 86.8% and 54% uncentred).

A data-free router also keeps its reference's profiles as its ``Background``: a query that matches a
reference task no indexed model covers goes to the base. The threshold alone cannot see that a task
is missing (a query of it still lands near some mis-predicted profile); the reference, whose
profiles come from data, can. Mapped across zoos, it sends far more of an unseen domain's queries to
the base at no more in-zoo accuracy lost (RESULTS.md, "Background tasks"). What each model covers
of it is its unwhitened profile (``mapped_profiles``).

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

from delta_router.embedding.embedder import DeltaEmbedder, Embedding, EmbeddingSpace, LiveModel
from delta_router.embedding.probes import ProbeSet
from delta_router.embedding.vectors import unit_rows
from delta_router.errors import DataError
from delta_router.home import cache_dir
from delta_router.models.base import BaseLM, resolve_base
from delta_router.routing.router import Background, QueryEncoder, ReferencePairs, Router, zoo_examples
from delta_router.search.index import ModelIndex

logger = logging.getLogger(__name__)

# Ridge strength and whitening shrinkage of the map, swept together on dev queries and scored by the
# lowest of four routed-right shares (leave one domain out on full and on wild, each zoo mapped by the
# other): a plateau over shrinkage 0.03-0.3 and alpha 0.01-0.1, and these in its middle (RESULTS.md,
# "Whitened deltas").
DEFAULT_ALPHA = 0.1
DEFAULT_SHRINKAGE = 0.1
COVER_ALPHA = 0.01  # the ridge of the unwhitened map behind a router's covers (``mapped_profiles``)
# The fallback threshold of a data-free router: of the thresholds that cost <= 5 points of in-zoo
# accuracy, the one that sends the most of a withheld domain's queries to the base, on dev queries of
# the full zoo (RESULTS.md, "Two kinds of delta, averaged"); with the withheld domain out of the map's
# population too, test: 82% for 5.1 points leave one domain out on full (RESULTS.md, "Abstention
# measured without the withheld domain").
DATA_FREE_THRESHOLD = 0.40
# What a ProfileMap reads of each finetune: "formats" or "plain", ``profile_embedder``'s deltas on
# ``ProbeSet.formats`` or ``ProbeSet.plain`` (a forward pass of 15 probes per finetune, cached);
# "formats+plain", both side by side, each mapped by its own ridge and the two predictions averaged;
# or "index", the vectors already in the index (free at any scale).
PROFILE_DELTAS = ("formats+plain", "formats", "plain", "index")
DEFAULT_PROFILE_DELTAS = "formats+plain"


@dataclass
class ProfileMap:
    """Kernel ridge from Delta Activations ``[n, d]`` to unit router profiles ``[n, d]``.

    ``predict(x) = unit(k(x) (K + alpha I)^-1 P)`` with the linear kernel of whitened unit deltas: a
    combination of the reference profiles, weighted by how the finetune's delta relates to the
    reference deltas. Deltas are centred on the mean of ``population``, whitened by its covariance
    shrunk toward isotropy (``(C + lam I)^-1/2``, lam ``shrinkage`` x the mean variance along its
    principal directions; None: not whitened), then unit-normed. The population is every delta in
    play, the reference's and the ones to profile (their vectors are known; no data is): centred on
    the reference alone, deltas of a domain the reference lacks carry that domain's whole offset, and
    leave-one-domain-out routing on the full zoo falls from 88.6% to 3.9% (below random). Whitened,
    the few directions that every recipe moves (how long, how hard, in which format a finetune was
    trained) no longer outweigh the ones that tell domains apart: on wild's test queries leave one
    domain out 83.2% -> 90.4% routed right, wild mapped by full 84.6% -> 88.6%, full unchanged
    (chosen on dev queries; RESULTS.md, "Whitened deltas").

    With ``blocks`` > 1 each row of deltas is that many equal blocks (kinds of delta side by side,
    ``delta_blocks``): each block gets its own ridge, and the prediction is the unit mean of theirs.
    """

    alpha: float = DEFAULT_ALPHA
    blocks: int = 1
    shrinkage: float | None = DEFAULT_SHRINKAGE

    def fit(
        self, deltas: np.ndarray, profiles: np.ndarray, population: np.ndarray | None = None
    ) -> ProfileMap:
        if len(deltas) != len(profiles) or len(deltas) < 2:
            raise DataError(
                f"a profile map needs >= 2 (delta, profile) pairs, got {len(deltas)} / {len(profiles)}"
            )
        deltas, profiles = np.asarray(deltas, dtype=np.float64), np.asarray(profiles, dtype=np.float64)
        if deltas.shape[1] % self.blocks:
            raise DataError(f"{deltas.shape[1]}-dim deltas do not split into {self.blocks} equal blocks")
        population = deltas if population is None else np.asarray(population, dtype=np.float64)
        blocks = np.split(population, self.blocks, axis=1)
        self.means_ = [block.mean(0) for block in blocks]
        self.whiteners_ = [self._whitener(b - mean) for b, mean in zip(blocks, self.means_, strict=True)]
        self.references_ = self._units(deltas)
        self.coefs_ = [
            np.linalg.solve(unit @ unit.T + self.alpha * np.eye(len(unit)), profiles)
            for unit in self.references_
        ]
        return self

    def predict(self, deltas: np.ndarray) -> np.ndarray:
        """Unit profiles ``[m, d]`` (float32) of finetunes with Delta Activations ``deltas`` ``[m, d]``."""
        units = self._units(np.asarray(deltas, dtype=np.float64))
        blocks = zip(units, self.references_, self.coefs_, strict=True)
        return unit_rows(sum(unit_rows(unit @ reference.T @ coef) for unit, reference, coef in blocks))

    def _whitener(self, centred: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """The population's principal directions ``[k, d]`` and the factor ``[k]`` that scales each:
        ``sqrt(lam / (var + lam))``, the shrunk whitening up to an overall scale (None: no whitening)."""
        if self.shrinkage is None:
            return None
        _, singular, directions = np.linalg.svd(centred, full_matrices=False)
        variances = singular**2 / len(centred)
        lam = max(self.shrinkage * float(variances.mean()), 1e-24)
        return directions, np.sqrt(lam / (variances + lam))

    def _units(self, deltas: np.ndarray) -> list[np.ndarray]:
        """``blocks`` x ``[n, d / blocks]``: each block of ``deltas`` less the population mean, whitened,
        unit rows."""
        units = []
        parts = zip(np.split(deltas, self.blocks, axis=1), self.means_, self.whiteners_, strict=True)
        for block, mean, whitener in parts:
            block = block - mean
            if whitener is not None:
                directions, factors = whitener
                block = block + ((block @ directions.T) * (factors - 1)) @ directions
            units.append(block / np.maximum(np.linalg.norm(block, axis=1, keepdims=True), 1e-12))
        return units


def delta_blocks(deltas: str) -> int:
    """How many blocks a ``ProfileMap`` splits deltas of kind ``deltas`` (``PROFILE_DELTAS``) into."""
    return len(deltas.split("+"))


def profile_embedder(
    base: str | BaseLM,
    progress: bool = False,
    live: LiveModel | None = None,
    deltas: str = "formats",
) -> DeltaEmbedder:
    """The embedder of the deltas a ``ProfileMap`` reads (``[n, hidden]``): 15 probes (``deltas``
    "plain": ``ProbeSet.plain``; "formats": the paper's 5 in each of the 3 prompt formats), each
    probe's shift unit-normed before the mean. ``live``: another embedder's live model of this base,
    to share instead of loading the base again."""
    if deltas not in ("formats", "plain"):
        raise DataError(f"no profile embedder for {deltas!r} deltas: it embeds 'formats' or 'plain'")
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
    """What a ``ProfileMap`` reads of each of ``model_ids``: ``[n, hidden * delta_blocks(deltas)]``
    float32, the ``deltas`` of ``PROFILE_DELTAS`` (``base``: the index's, already loaded, to skip
    loading it again). The embedders of a kind's parts share one copy of the base."""
    embeddings = [index.get(m).embedding for m in model_ids]
    base = base or index.space.base_name
    made: list[DeltaEmbedder] = []

    def embedder_of(kind: str) -> DeltaEmbedder:
        made.append(profile_embedder(base, progress, live=made[0].live if made else None, deltas=kind))
        return made[-1]

    return profile_deltas_of(embeddings, deltas, embedder_of)


def profile_deltas_of(
    embeddings: Sequence[Embedding], deltas: str, embedder_of: Callable[[str], DeltaEmbedder]
) -> np.ndarray:
    """``profile_deltas`` of embedded finetunes, indexed or not: ``[n, hidden * delta_blocks(deltas)]``
    float32; "index" reads their vectors, any other kind runs ``embedder_of(part)`` on their files for
    each part of it ("formats+plain": two), side by side (cached)."""
    if deltas not in PROFILE_DELTAS:
        raise DataError(f"unknown profile deltas {deltas!r}; choose from {', '.join(PROFILE_DELTAS)}")
    if deltas == "index":
        return np.stack([e.vector for e in embeddings]).astype(np.float32)
    paths = [e.path for e in embeddings]
    return np.hstack([embedder_of(part).transform(paths) for part in deltas.split("+")])


def reference_pairs(
    zoos,
    encoder: QueryEncoder,
    deltas: str = DEFAULT_PROFILE_DELTAS,
    progress: bool = False,
    space: tuple[EmbeddingSpace, str] | None = None,
) -> tuple[np.ndarray, Router]:
    """The reference of one built zoo or several (of one base and probe set): their domain finetunes'
    ``profile_deltas`` ``[n, d]`` and one data-based ``Router`` over all of them, from their training
    prompts (ids ``<zoo>_<member>`` when several, zoos in name order); both cached under the home.
    ``space``: the space of the index the pairs will map and what to call it; every zoo's must match
    (``SpaceMismatchError`` naming both otherwise).

    The map carries a domain over best for recipes its reference has seen: wild's finetunes, mapped
    by ``full`` alone, route 84.6% of wild's test queries right; by ``full`` + wild's finetunes of
    the other domains, 90.4% (RESULTS.md, "Two kinds of delta, averaged")."""
    zoos = _in_name_order(zoos)
    if not zoos:
        raise DataError("a reference needs at least one built zoo")
    indexes = [zoo.load_index() for zoo in zoos]
    expected, named = space or (indexes[0].space, f"the zoo {zoos[0].spec.name}")
    for zoo, index in zip(zoos, indexes, strict=True):
        expected.check_same(index.space, named, f"the reference zoo {zoo.spec.name}")
    fingerprinted = {k: v for k, v in indexes[0].space.to_dict().items() if k != "probe_texts"}
    names = zoos[0].spec.name if len(zoos) == 1 else [zoo.spec.name for zoo in zoos]
    examples = [zoo_examples(zoo) for zoo in zoos]  # the cache is keyed by them: a rebuilt zoo refits
    prefixes = _row_prefixes(zoos)
    prompts = {p + m: t for p, ex in zip(prefixes, examples, strict=True) for m, t in ex.items()}
    key = json.dumps([names, fingerprinted, encoder.layer, encoder.pooling, encoder.max_length, prompts])
    directory = cache_dir("references") / hashlib.sha256(key.encode()).hexdigest()[:16]
    members = [[m.id for m in zoo.spec.members() if m.kind == "domain"] for zoo in zoos]  # the router's rows
    if (directory / "router.json").exists():
        router = Router.load(directory)
        if router.model_ids != list(prompts):  # written over by hand, or by another version
            raise DataError(f"the cached reference router {directory} does not match its zoos: remove it")
    else:
        base = zoos[0].base
        router = Router.fit(encoder, base.fingerprint, prompts, progress, base_name=base.name)
        router.save(directory, force=True)
    vectors = [
        profile_deltas(index, ids, deltas, zoo.base, progress)
        for zoo, index, ids in zip(zoos, indexes, members, strict=True)
    ]
    return np.vstack(vectors), router


def _in_name_order(zoos) -> list:
    """One zoo or several, as a list in name order: the order of ``reference_pairs``' rows."""
    return sorted(zoos, key=lambda zoo: zoo.spec.name) if isinstance(zoos, list | tuple) else [zoos]


def _row_prefixes(zoos: list) -> list[str]:
    """What each zoo's member ids are prefixed with in a reference's rows: ``<zoo>_`` when several."""
    return [f"{zoo.spec.name}_" if len(zoos) > 1 else "" for zoo in zoos]


def reference_domains(zoos) -> dict[str, str]:
    """The rows of ``reference_pairs(zoos)`` (its router's model ids, in order) -> their domains: ids
    ``<zoo>_<member>`` when several zoos (zoos in name order), the member ids of one."""
    zoos = _in_name_order(zoos)
    return {
        prefix + m.id: m.label
        for zoo, prefix in zip(zoos, _row_prefixes(zoos), strict=True)
        for m in zoo.spec.members()
        if m.kind == "domain"
    }


def fit_data_free(
    index: ModelIndex,
    reference_deltas: np.ndarray,
    reference: Router,
    alpha: float = DEFAULT_ALPHA,
    deltas: str = DEFAULT_PROFILE_DELTAS,
    progress: bool = False,
    background: bool = True,
    shrinkage: float | None = DEFAULT_SHRINKAGE,
    **options,
) -> Router:
    """A ``Router`` over every model of ``index``, profiled from its ``profile_deltas`` (of the same
    kind as ``reference_deltas``) by a ``ProfileMap`` (ridge ``alpha``, whitening ``shrinkage``)
    fitted on the reference pairs; queries centred like the reference router's. With
    ``background``, the reference's profiles are its ``Background``:
    a query of a reference task that too few indexed models cover goes to the base (what each covers:
    ``mapped_profiles``). The router keeps the reference pairs, so a model registered later is
    mapped the same way."""
    if index.space is None or len(index) == 0:
        raise DataError("the index is empty: add finetunes before fitting a router")
    reference.check_base(index.space.base, "the index's base")
    if len(reference_deltas) != len(reference.model_ids):
        raise DataError(f"{len(reference_deltas)} reference deltas for {len(reference.model_ids)} profiles")
    ids = index.model_ids()
    vectors = profile_deltas(index, ids, deltas, progress=progress)
    population = np.vstack([reference_deltas, vectors])
    pairs = ReferencePairs(reference_deltas, reference.profiles, deltas, alpha, shrinkage)
    profiles, covers = mapped_profiles(pairs, vectors, population)
    settings = {"layer": reference.layer, "pooling": reference.pooling, "max_length": reference.max_length}
    logger.info("data-free profiles: %d models, %s deltas, %d pairs", len(ids), deltas, len(reference_deltas))
    options.setdefault("threshold", DATA_FREE_THRESHOLD)
    tasks = Background(reference.profiles) if background else None
    if tasks is not None and tasks.uncovered(covers).all():
        logger.warning(
            "no reference task is covered by %d of these %d models: every query will go to the base "
            "(a pool this small wants --no-background)", tasks.support, len(ids)
        )  # fmt: skip
    return Router(
        ids, profiles, reference.center, reference.base_fingerprint, **settings,
        base_name=reference.base_name, sources=["data-free"] * len(ids), background=tasks,
        covers=None if covers is profiles else covers, reference=pairs, **options,
    )  # fmt: skip


def mapped_profiles(
    pairs: ReferencePairs, deltas: np.ndarray, population: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Data-free profiles ``[m, d]`` of finetunes with ``profile_deltas`` ``deltas`` ``[m, h]``, by
    the ``ProfileMap`` of the reference ``pairs`` (centred on ``population``, every delta in play),
    centred on their mean (``centred_profiles``); and what each covers of a background ``[m, d]``:
    the same by the unwhitened map (ridge ``COVER_ALPHA``; an unwhitened router's covers are its
    profiles, the same array). Whitening ranks a pool's models better but lands some finetunes
    nearer a reference task than they are: whitened, both of wild's CSQA finetunes cover `full`'s
    science task, and a pool without science finetunes sends 30% of science queries to the base, not
    95% (wild mapped by full, dev queries: 70% of a withheld domain's queries to the base within 5
    points whitened, 78% with these covers, 79% unwhitened; RESULTS.md, "Whitened deltas")."""
    blocks = delta_blocks(pairs.deltas_kind)

    def by(alpha: float, shrinkage: float | None) -> np.ndarray:
        mapping = ProfileMap(alpha, blocks, shrinkage).fit(pairs.deltas, pairs.profiles, population)
        return centred_profiles(mapping.predict(deltas))

    profiles = by(pairs.alpha, pairs.shrinkage)
    return profiles, profiles if pairs.shrinkage is None else by(COVER_ALPHA, None)


def nearest_references(router: Router, reference: Router) -> list[tuple[str, float]]:
    """For each of ``router``'s models, the ``reference`` finetune whose data-based profile is nearest
    to its profile, and their cosine: what the map takes each finetune for. A data-free profile is a
    guess; one that lands on another domain's finetune (on ``wild`` mapped by ``full``, 12 of 38;
    7 unwhitened) is routed that domain's queries."""
    sims = router.profiles @ unit_rows(reference.profiles).T
    return [(reference.model_ids[j], float(row[j])) for row, j in zip(sims, sims.argmax(1), strict=True)]


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
    deltas: np.ndarray,
    profiles: np.ndarray,
    groups: list[str],
    alpha: float = DEFAULT_ALPHA,
    blocks: int = 1,
    shrinkage: float | None = DEFAULT_SHRINKAGE,
) -> np.ndarray:
    """Each finetune's profile predicted by a map fitted without its group (e.g. its domain): how the
    data-free router does on finetunes of a kind the reference never held. ``[n, d]`` float32;
    ``blocks``, ``shrinkage``: ``ProfileMap``'s."""
    groups_arr = np.asarray(groups)
    predicted = np.zeros(np.shape(profiles), dtype=np.float32)
    for group in sorted(set(groups)):
        held = groups_arr == group
        mapping = ProfileMap(alpha, blocks, shrinkage).fit(deltas[~held], profiles[~held], population=deltas)
        predicted[held] = mapping.predict(deltas[held])
    return predicted
