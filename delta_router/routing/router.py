"""``Router``: send each query to the finetune whose task it looks like, at inference time.

Each model in an index gets a *task profile*: the base model's pooled activation on a few of its
task's prompts, centred on the mean over all profiles (the training-free query space of the
selector's ``"activations"`` method). A query is encoded the same way by **one base forward** and
routed to the profile with the highest cosine similarity: top-1, or top-k with softmax weights, with
a fallback to the base model below a confidence threshold, or when the query matches a task of the
router's ``Background`` that too few of its models cover.

Why not measure each adapter's own activation shift on the query? It costs one forward per
candidate per query (29 adapters ~ 2.5 s on 2 CPU cores for a 60-token query), more than the
generation it routes; the profile costs one base forward (``benchmarks/route_accuracy.py``).

Profiles come from examples per model: a zoo's training data (``Router.fit_zoo``) or the user's
files (``delta-router route fit --examples MODEL=FILE``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from delta_router import checks
from delta_router.data import Record
from delta_router.embedding.embedder import encode_texts
from delta_router.embedding.vectors import unit_rows
from delta_router.errors import DataError, IncompatibleBaseError
from delta_router.home import atomic_directory, atomic_write_text
from delta_router.model_ids import BASE_ADAPTER, check_model_id
from delta_router.models.base import BaseFingerprint
from delta_router.serialize import to_json

logger = logging.getLogger(__name__)

ROUTER_FORMAT = 1
# A fitted router sends a query to the base when its best cosine is below this. Chosen on dev queries
# (the few-shot pool's records 60-99) of full and wild, each domain withheld in turn and out of the
# centre of the query space: the threshold whose lower share of withheld queries sent to the base is
# highest within 5 points of in-zoo accuracy on both. On full it sends 81% for 4.6 points (dev), 84%
# for 5.7 (test), 81% for 3.2 (fresh); on wild 52-56%. RESULTS.md, "The data-based threshold".
DEFAULT_THRESHOLD = 0.43


def query_text(record: Record) -> str:
    """What the router reads of a record: the task text, without the Alpaca template."""
    return f"{record.instruction}\n\n{record.input}".strip()


def zoo_examples(zoo, per_model: int = 32, kinds=("domain",)) -> dict[str, list[str]]:
    """``{member id: its first per_model training prompts as query texts}`` of a zoo's ``kinds`` members."""
    members = [m for m in zoo.spec.members() if m.kind in kinds]
    return {m.id: [query_text(r) for r in zoo.training_records(m)[:per_model]] for m in members}


class QueryEncoder:
    """The base's pooled hidden state of raw texts: ``__call__(texts) -> [N, d]`` fp32.

    The router's settings bound to ``embedder.encode_texts``, the project's one batched text encoder.
    ``body`` is the transformer without its LM head (``model.base_model``); texts are cut to
    ``max_length`` tokens: on the full zoo, 128 tokens route as accurately as 256 at 60% of the
    cost, 64 lose ~2 points (``benchmarks/RESULTS.md``).
    """

    def __init__(
        self,
        body: torch.nn.Module,
        tokenizer,
        layer: int = -1,
        pooling: str = "mean",
        max_length: int = 128,
        batch_size: int = 16,
    ):
        self.body, self.tokenizer = body, tokenizer
        self.layer, self.pooling, self.max_length, self.batch_size = layer, pooling, max_length, batch_size

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        options = (self.layer, self.pooling, self.max_length, self.batch_size)
        return encode_texts(self.body, self.tokenizer, texts, *options)

    @classmethod
    def for_model(cls, model: torch.nn.Module, tokenizer, **options) -> QueryEncoder:
        """An encoder over a causal LM's body (works for a PEFT-wrapped LM too)."""
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        return cls(model.base_model, tokenizer, **options)


def mean_queries(
    encoder: QueryEncoder, examples: Mapping[str, Sequence[str]], progress: bool = False
) -> np.ndarray:
    """Each model's mean encoded example, ``[M, d]`` float32 in ``examples``' order
    (``{model_id: [text, ...]}``, a few query texts per model): what ``Router.fit`` profiles."""
    if not isinstance(examples, Mapping):
        raise TypeError(f"examples must be a dict of model id -> texts, got {type(examples).__name__}")
    examples = {m: checks.texts(texts, f"examples[{m!r}]") for m, texts in examples.items()}
    empty = [m for m, texts in examples.items() if not texts]
    if empty or not examples:
        raise DataError(f"every model needs profile examples; none for {empty or 'any model'}")
    bar = tqdm(examples.values(), desc="profiles", unit="model", disable=not progress)
    return np.stack([encoder(texts).mean(0).numpy() for texts in bar])


@dataclass
class RouteDecision:
    """Where one query goes: ``adapters`` with ``weights`` (summing to 1); empty = the base model."""

    adapters: list[str]
    weights: list[float]
    score: float  # cosine similarity of the best profile
    scores: dict[str, float] = field(default_factory=dict)  # the top candidates' similarities
    fallback: str | None = None  # why the base serves it: "threshold" or "background"; None: routed

    @property
    def target(self) -> str:
        """One name for what serves the query: an adapter id, ``a+b`` for a mix, or the base."""
        return "+".join(self.adapters) if self.adapters else BASE_ADAPTER

    def to_dict(self) -> dict:
        return to_json(self) | {"target": self.target}


PROFILE_SOURCES = ("examples", "data-free")  # how a profile was made: from queries, or from weights

# A background task is covered when at least ``BACKGROUND_SUPPORT`` routed models' cover vectors have
# at least ``BACKGROUND_COVERAGE`` cosine to it. A data-free model covers its own (centred) profile.
# Chosen on dev queries with the withheld domain's finetunes in no population (as a pool that lacks
# a domain is fitted), by the lowest of the four cross-zoo configurations' withheld queries sent to
# the base within 5 points of in-zoo accuracy: 0% -> 72% (the uncentred predictions as covers at 0.5
# break a union reference), confirmed on fresh queries (0% -> 71%) (RESULTS.md, "Abstention measured
# without the withheld domain"). One mis-predicted profile near a missing task does not hide it
# (support 2); the cost: a domain with a single finetune in the pool never covers its reference
# task, so its queries go to the base when they match that task best.
BACKGROUND_COVERAGE = 0.55
BACKGROUND_SUPPORT = 2
# What an uncovered task must beat to claim a query (``Background.rival``): "covered", the query's
# best cosine to a covered background task, like for like (both are data-based profiles of the
# reference); "routed", its best cosine to a routed model's profile (a prediction, for a data-free
# router), as routers saved before 2026-12-07 compare. By ``BACKGROUND_MARGIN``: an uncovered task
# within 0.075 of the best covered one still claims the query. Chosen on dev queries (coverage 0.55-0.6
# and margin -0.05 to -0.1 a plateau), then confirmed on fresh and test records: the most withheld
# queries to the base within 5 points, wild mapped by full 78% -> 81% (dev), 79% -> 80% (fresh),
# 78% -> 83% (test); full mapped by wild 93% -> 98%, 96% -> 98%, 93% -> 97% (RESULTS.md, "The
# background judged against covered tasks").
BACKGROUND_RIVALS = ("covered", "routed")
BACKGROUND_RIVAL = "covered"
BACKGROUND_MARGIN = -0.075


@dataclass
class Background:
    """Profiles of tasks a router's models may not cover, ``[B, d]`` unit rows in its centred query
    space: for a data-free router, its reference zoo's data-based profiles.

    A background task that fewer than ``support`` routed models cover (cosine >= ``coverage`` to
    their cover vectors) stands for a task the pool lacks. A query goes to the base when such a task
    matches it better than its ``rival`` plus ``margin``: the best covered background task
    (``"covered"``; with none covered, every query goes to the base), or the best routed model
    (``"routed"``). Coverage follows the router's models: a model added to the router (say, the
    registry's) counts towards its task's support from then on.
    """

    profiles: np.ndarray
    coverage: float = BACKGROUND_COVERAGE
    margin: float = BACKGROUND_MARGIN
    support: int = BACKGROUND_SUPPORT
    rival: str = BACKGROUND_RIVAL

    def __post_init__(self) -> None:
        self.coverage, self.margin = float(self.coverage), float(self.margin)
        if not (-1 <= self.coverage <= 1 and -2 <= self.margin <= 2):
            bounds = f"got {self.coverage}, {self.margin}"
            raise ValueError(f"coverage is a cosine in [-1, 1] and margin in [-2, 2], {bounds}")
        if isinstance(self.support, bool) or not isinstance(self.support, int) or self.support < 1:
            raise ValueError(f"support is a number of models >= 1, got {self.support!r}")
        if self.rival not in BACKGROUND_RIVALS:
            raise ValueError(f"rival is one of {BACKGROUND_RIVALS}, got {self.rival!r}")
        self.profiles = np.asarray(self.profiles, dtype=np.float32)
        if self.profiles.ndim != 2 or not len(self.profiles):
            raise ValueError(f"background profiles must be [B, d] with B >= 1, got {self.profiles.shape}")
        self.profiles = unit_rows(self.profiles)

    def uncovered(self, covers: np.ndarray) -> np.ndarray:
        """``[B]`` bool: the background tasks that fewer than ``support`` cover vectors (``[M, d]``,
        unit) reach."""
        return ((self.profiles @ covers.T) >= self.coverage).sum(1) < self.support

    def claims(self, queries: np.ndarray, best: np.ndarray, uncovered: np.ndarray) -> np.ndarray:
        """``[Q]`` bool: which unit queries ``[Q, d]`` (best routed cosines ``best`` ``[Q]``) go to
        the base because an ``uncovered`` task (``uncovered``'s ``[B]`` mask) matches them better
        than their rival."""
        if not uncovered.any():
            return np.zeros(len(queries), dtype=bool)
        sims = queries @ self.profiles.T
        if self.rival == "routed":
            rival = best
        else:
            rival = sims[:, ~uncovered].max(1) if (~uncovered).any() else np.full(len(queries), -np.inf)
        return sims[:, uncovered].max(1) > rival + self.margin


@dataclass
class ReferencePairs:
    """The (delta, profile) pairs a data-free router's ``ProfileMap`` was fitted on: ``deltas``
    ``[n, h * blocks]`` of kind ``deltas_kind`` (``routing.data_free.PROFILE_DELTAS``), data-based
    ``profiles`` ``[n, d]``, ridge ``alpha``, whitening ``shrinkage`` (None: not whitened). Kept with
    the router so that a model added later (the live registry's) is profiled by the same map as the
    models it was fitted with."""

    deltas: np.ndarray
    profiles: np.ndarray
    deltas_kind: str
    alpha: float
    shrinkage: float | None

    def __post_init__(self) -> None:
        self.deltas = np.asarray(self.deltas, dtype=np.float32)
        self.profiles = np.asarray(self.profiles, dtype=np.float32)
        if self.deltas.ndim != 2 or self.profiles.ndim != 2 or len(self.deltas) != len(self.profiles):
            raise ValueError(f"reference pairs: deltas {self.deltas.shape}, profiles {self.profiles.shape}")


class Router:
    """Profiles ``[M, d]`` (unit rows) of ``model_ids`` in the centred query space of one base;
    ``sources[i]`` (``PROFILE_SOURCES``) says how profile ``i`` was made (default: from examples).

    ``background`` (optional): tasks whose queries go to the base unless a model covers them, read
    against ``covers`` ``[M, d]``, what each model covers (default: its profile; older data-free routers,
    saved with a ``covers.npy``, keep their models' uncentred map predictions). ``reference``: a data-free
    router's ``ReferencePairs``."""

    def __init__(
        self,
        model_ids: Sequence[str],
        profiles: np.ndarray,
        center: np.ndarray,
        base_fingerprint: BaseFingerprint,
        layer: int = -1,
        pooling: str = "mean",
        max_length: int = 128,
        top_k: int = 1,
        threshold: float | None = None,
        temperature: float = 0.05,
        base_name: str = "",
        sources: Sequence[str] | None = None,
        background: Background | None = None,
        covers: np.ndarray | None = None,
        reference: ReferencePairs | None = None,
    ):
        if len(model_ids) != len(profiles) or not len(model_ids):
            raise DataError(f"{len(model_ids)} model ids for {len(profiles)} profiles")
        for model_id in model_ids:
            check_model_id(model_id)
        checks.count(top_k, "top_k")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0 (the softmax over the top-k), got {temperature}")
        if threshold is not None and not -1 <= threshold <= 1:
            raise ValueError(f"threshold is a cosine similarity in [-1, 1], got {threshold}")
        self.sources = list(sources) if sources is not None else ["examples"] * len(model_ids)
        unknown = set(self.sources) - set(PROFILE_SOURCES)
        if len(self.sources) != len(model_ids) or unknown:
            raise DataError(f"profile sources must be one of {PROFILE_SOURCES} per model, got {sources}")
        self.model_ids, self.profiles, self.center = list(model_ids), profiles.astype(np.float32), center
        # no covers given: the profiles themselves (one array, never written in place: no copy)
        self.covers = self.profiles if covers is None else unit_rows(np.asarray(covers, np.float32))
        if self.covers.shape != self.profiles.shape:
            raise DataError(f"cover vectors {self.covers.shape} for profiles {self.profiles.shape}")
        self.background, self.reference = background, reference
        self._uncovered: tuple | None = None  # (covers, background, its uncovered tasks' mask)
        self.base_fingerprint, self.layer, self.pooling = base_fingerprint, layer, pooling
        self.max_length = max_length
        self.top_k, self.threshold, self.temperature = top_k, threshold, temperature
        self.base_name = base_name  # how to load the base again (embedded name, dir or HF id)

    # ---- fitting -------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        encoder: QueryEncoder,
        base_fingerprint: BaseFingerprint,
        examples: Mapping[str, Sequence[str]],
        progress: bool = False,
        **options,
    ) -> Router:
        """Profiles from a few query texts per model id (``{model_id: [text, ...]}``); ``threshold``
        defaults to ``DEFAULT_THRESHOLD``."""
        means = mean_queries(encoder, examples, progress)
        logger.info("router fitted on %d models", len(means))
        return cls.from_means(list(examples), means, encoder, base_fingerprint, **options)

    @classmethod
    def from_means(
        cls,
        model_ids: Sequence[str],
        means: np.ndarray,
        encoder: QueryEncoder,
        base_fingerprint: BaseFingerprint,
        **options,
    ) -> Router:
        """Profiles from each model's mean encoded example ``[M, d]`` (``encoder``'s space): centred on
        their mean, unit rows. A router over a subset of the models is ``from_means`` of their rows:
        centred on them alone, as ``fit`` on their examples would centre it."""
        means = np.asarray(means, dtype=np.float32)
        center = means.mean(0)
        settings = (encoder.layer, encoder.pooling, encoder.max_length)
        options.setdefault("threshold", DEFAULT_THRESHOLD)
        return cls(list(model_ids), unit_rows(means - center), center, base_fingerprint, *settings, **options)

    @classmethod
    def fit_zoo(cls, zoo, encoder: QueryEncoder, per_model: int = 32, kinds=("domain",), **options) -> Router:
        """Profiles from each zoo member's own training prompts (members of ``kinds`` only)."""
        examples = zoo_examples(zoo, per_model, kinds)
        return cls.fit(encoder, zoo.base.fingerprint, examples, base_name=zoo.base.name, **options)

    def add(
        self, model_id: str, profile: np.ndarray, source: str = "examples", cover: np.ndarray | None = None
    ) -> None:
        """Route to ``model_id`` too, with ``profile`` ([d], in this router's centred query space)
        made from ``source``; ``cover``: what it covers of the background (default: the profile)."""
        if model_id in self.model_ids:
            raise DataError(f"{model_id!r} is routed already")
        if source not in PROFILE_SOURCES:
            raise DataError(f"profile source must be one of {PROFILE_SOURCES}, got {source!r}")
        self.model_ids.append(model_id)
        self.sources.append(source)
        row = unit_rows(np.asarray(profile, np.float32)[None])
        profiles = np.vstack([self.profiles, row])
        if self.covers is self.profiles and cover is None:  # the profiles are the covers: one array
            covers = profiles
        else:
            covers = np.vstack(
                [self.covers, row if cover is None else unit_rows(np.asarray(cover, np.float32)[None])]
            )
        self.profiles, self.covers = profiles, covers

    def remove(self, model_id: str) -> None:
        """Stop routing to ``model_id``."""
        i = self.model_ids.index(model_id)
        del self.model_ids[i], self.sources[i]
        profiles = np.delete(self.profiles, i, axis=0)
        covers = profiles if self.covers is self.profiles else np.delete(self.covers, i, axis=0)
        self.profiles, self.covers = profiles, covers

    # ---- routing -------------------------------------------------------------------------------
    def similarities(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """Cosine similarity of encoded queries ``[Q, d]`` to every profile: ``[Q, M]``."""
        return self._unit_queries(features) @ self.profiles.T

    def _unit_queries(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        return unit_rows(np.asarray(features, dtype=np.float32) - self.center)

    def _uncovered_tasks(self) -> np.ndarray:
        """Which of the background's tasks too few models cover, ``[B]`` bool; recomputed only when the
        covers or the background change (``add``/``remove`` replace the covers): ``B x M`` cosines, per
        decision a cost at hub scale."""
        cached = self._uncovered
        if cached is None or cached[0] is not self.covers or cached[1] is not self.background:
            cached = self._uncovered = (self.covers, self.background, self.background.uncovered(self.covers))
        return cached[2]

    def assess(self, features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What ``decide`` reads of encoded queries ``[Q, d]``: their cosines to every profile
        ``[Q, M]``, and ``[Q]`` bool, the queries the background sends to the base."""
        queries = self._unit_queries(features)
        sims = queries @ self.profiles.T
        claimed = np.zeros(len(sims), dtype=bool)
        if self.background is not None:
            claimed = self.background.claims(queries, sims.max(1), self._uncovered_tasks())
        return sims, claimed

    def decide(self, features: torch.Tensor | np.ndarray) -> list[RouteDecision]:
        """One decision per encoded query ``[Q, d]``."""
        sims, claimed = self.assess(features)
        decisions = []
        for row, to_background in zip(sims, claimed, strict=True):
            order = np.argsort(-row, kind="stable")[: self.top_k]
            top = {self.model_ids[i]: float(row[i]) for i in order}
            best = float(row[order[0]])
            if to_background or (self.threshold is not None and best < self.threshold):
                decisions.append(
                    RouteDecision([], [], best, top, "background" if to_background else "threshold")
                )
                continue
            logits = row[order] / self.temperature
            weights = np.exp(logits - logits.max())
            weights /= weights.sum()
            decisions.append(RouteDecision(list(top), [float(w) for w in weights], best, top))
        return decisions

    def route(self, encoder: QueryEncoder, texts: Sequence[str]) -> list[RouteDecision]:
        """Encode ``texts`` with the base (one batched forward) and decide."""
        self.check_encoder(encoder)
        return self.decide(encoder(checks.texts(texts)))

    @property
    def encoder_options(self) -> dict:
        """How queries must be encoded to land in this router's space (``QueryEncoder`` options)."""
        return {"layer": self.layer, "pooling": self.pooling, "max_length": self.max_length}

    def check_encoder(self, encoder: QueryEncoder) -> None:
        theirs = {key: getattr(encoder, key) for key in self.encoder_options}
        if theirs != self.encoder_options:
            raise DataError(f"router profiles use {self.encoder_options}, the query encoder {theirs}")

    def check_base(self, fingerprint: BaseFingerprint, what: str = "the server's base") -> None:
        ours = self.base_fingerprint
        if fingerprint.id != ours.id:
            raise IncompatibleBaseError(
                f"this router was fitted on base {ours.id} (hidden {ours.hidden_size}); "
                f"{what} is {fingerprint.id} (hidden {fingerprint.hidden_size})"
            )

    def restricted(self, keep: Callable[[str], bool]) -> Router:
        """A router over the models for which ``keep(model_id)`` holds (same profiles and centre)."""
        rows = [i for i, m in enumerate(self.model_ids) if keep(m)]
        if not rows:
            raise DataError("no model left to route to")
        return Router(
            [self.model_ids[i] for i in rows], self.profiles[rows], self.center, self.base_fingerprint,
            self.layer, self.pooling, self.max_length, self.top_k, self.threshold, self.temperature,
            self.base_name, [self.sources[i] for i in rows], self.background,
            None if self.covers is self.profiles else self.covers[rows], self.reference,
        )  # fmt: skip

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path, force: bool = False) -> Path:
        """``router.json`` + ``profiles.npy`` (+ ``covers.npy``, ``background.npy`` and
        ``reference.npz`` when it has them), written to a temp dir and renamed.

        An existing non-empty ``directory`` is refused unless ``force``.
        """
        meta = {
            "format": ROUTER_FORMAT,
            "model_ids": self.model_ids,
            "base": self.base_fingerprint.to_dict(),
            "base_name": self.base_name,
            "layer": self.layer,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "top_k": self.top_k,
            "threshold": self.threshold,
            "temperature": self.temperature,
            "sources": self.sources,
            "background": None if self.background is None else {
                "coverage": self.background.coverage, "margin": self.background.margin,
                "support": self.background.support, "rival": self.background.rival,
            },
            "reference": None if self.reference is None else {
                "deltas_kind": self.reference.deltas_kind, "alpha": self.reference.alpha,
                "shrinkage": self.reference.shrinkage,
            },
        }  # fmt: skip
        with atomic_directory(Path(directory), force=force) as tmp:
            np.save(tmp / "profiles.npy", np.vstack([self.profiles, self.center[None]]))
            if self.covers is not self.profiles and not np.array_equal(self.covers, self.profiles):
                np.save(tmp / "covers.npy", self.covers)
            if self.background is not None:
                np.save(tmp / "background.npy", self.background.profiles)
            if (pairs := self.reference) is not None:
                np.savez(tmp / "reference.npz", deltas=pairs.deltas, profiles=pairs.profiles)
            atomic_write_text(tmp / "router.json", json.dumps(meta, indent=2))
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, **overrides) -> Router:
        directory = Path(directory)
        try:
            meta = json.loads((directory / "router.json").read_text())
            matrix = np.load(directory / "profiles.npy")
            # no covers.npy: the profiles are the covers (and routers saved before backgrounds were kept)
            covers = np.load(directory / "covers.npy") if (directory / "covers.npy").exists() else None
            background = reference = None
            if isinstance(meta, dict) and meta.get("background") is not None:
                # as fitted: saved before support was kept, support 1; before rival was, "routed"
                saved = {"support": 1, "rival": "routed"} | meta["background"]
                background = Background(np.load(directory / "background.npy"), **saved)
            if isinstance(meta, dict) and meta.get("reference") is not None:
                with np.load(directory / "reference.npz") as pairs:  # saved before whitening: none
                    settings = {"shrinkage": None} | meta["reference"]
                    reference = ReferencePairs(pairs["deltas"], pairs["profiles"], **settings)
        except (OSError, ValueError, TypeError) as err:
            raise DataError(f"{directory} is not a saved router ({err})") from err
        if not isinstance(meta, dict):
            raise DataError(f"{directory} is not a saved router (router.json holds no JSON object)")
        if meta.get("format") != ROUTER_FORMAT:
            raise DataError(
                f"{directory}: router format {meta.get('format')}, this version reads {ROUTER_FORMAT}"
            )
        try:
            options = {k: meta[k] for k in ("top_k", "threshold", "temperature", "base_name")} | overrides
            options["sources"] = meta.get("sources")  # routers saved before sources were kept: examples
            options |= {"background": background, "covers": covers, "reference": reference}
            return cls(
                meta["model_ids"],
                matrix[:-1],
                matrix[-1],
                BaseFingerprint.from_dict(meta["base"]),
                meta["layer"],
                meta["pooling"],
                meta["max_length"],
                **options,
            )
        except (KeyError, TypeError, ValueError, IndexError) as err:  # StoredFieldError is a ValueError
            raise DataError(f"{directory / 'router.json'}: missing or malformed field ({err!r})") from err
