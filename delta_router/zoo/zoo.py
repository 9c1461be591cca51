"""A model zoo: LoRA finetunes of one base on real domain data, embedded into a ``ModelIndex``.

A ``ZooSpec`` lists the members: one finetune per domain and training third (``kind=domain``),
finetunes on a mixture of two domains (``kind=mixture``, for the additivity ablation) and
finetunes with other hyper-parameters (``kind=robustness``). ``Zoo.build`` trains what is missing
(everything is cached by data and config), embeds every member and saves the index.

Layout under ``$DELTA_ROUTER_HOME/zoo/<spec>-<base fingerprint>/``: ``adapters/<member>/`` (PEFT
adapter + ``training.json``), ``index/`` (the ``ModelIndex``), ``report/`` (``zoo report``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from delta_router.data import DomainSplits, Record, load_domain
from delta_router.embedding.embedder import DeltaEmbedder
from delta_router.home import cache_dir
from delta_router.models.base import DEFAULT_BASE, BaseLM, resolve_base
from delta_router.search.index import ModelIndex
from delta_router.search.selector import FEWSHOT_TRAIN_CONFIG
from delta_router.training.trainer import LoraTrainer, TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooMember:
    """One finetune of the zoo: which data it sees and how it differs from the spec's recipe."""

    id: str
    domains: tuple[str, ...]
    part: int
    kind: str = "domain"  # "domain" | "mixture" | "robustness"
    variant: str = "default"
    options: tuple[tuple[str, float], ...] = ()  # TrainConfig overrides; learning_rate is a factor

    @property
    def label(self) -> str:
        """The domain tag (``a+b`` for a mixture)."""
        return "+".join(self.domains)

    def tags(self) -> dict[str, str]:
        return {"domain": self.label, "kind": self.kind, "part": str(self.part), "variant": self.variant}


ROBUSTNESS_VARIANTS: dict[str, dict[str, float]] = {
    "r4": {"rank": 4, "alpha": 8},
    "r16": {"rank": 16, "alpha": 32},
    "lr-half": {"learning_rate": 0.5},
    "lr-double": {"learning_rate": 2.0},
    "half-data": {"num_examples": 0.5},
}


@dataclass(frozen=True)
class ZooSpec:
    """Which finetunes make a zoo and the recipe they share (``train_size`` records each)."""

    name: str
    domains: tuple[str, ...]
    parts: int = 3
    mixtures: tuple[tuple[str, str], ...] = ()
    robustness_domains: tuple[str, ...] = ()
    train_size: int = 256
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0

    def members(self) -> list[ZooMember]:
        members = [ZooMember(f"{d}-{p}", (d,), p) for d in self.domains for p in range(self.parts)]
        members += [ZooMember(f"mix-{a}+{b}", (a, b), 0, kind="mixture") for a, b in self.mixtures]
        members += [
            ZooMember(f"{d}-{name}", (d,), 1, "robustness", name, tuple(sorted(opts.items())))
            for d in self.robustness_domains
            for name, opts in ROBUSTNESS_VARIANTS.items()
        ]
        return members

    def train_config(self, member: ZooMember) -> TrainConfig:
        options = dict(member.options)
        config = self.train
        if "learning_rate" in options:
            options["learning_rate"] = config.learning_rate * options["learning_rate"]
        if "num_examples" in options:
            options["num_examples"] = int(self.train_size * options["num_examples"])
        for key in ("rank", "alpha"):
            if key in options:
                options[key] = int(options[key])
        return config.with_options(**options)


# Sized for a 2-core CPU (benchmarks/RESULTS.md): 128-token examples, 6 steps of 16 (full, ~40 min)
# or 4 steps (small, for `make demo`: the two small data wheels plus the base, ~8 min).
ZOO_SPECS: dict[str, ZooSpec] = {
    "full": ZooSpec(
        "full",
        ("commonsense", "math", "biomedical", "legal", "code", "science", "sentiment"),
        mixtures=(("math", "code"), ("biomedical", "science"), ("legal", "sentiment")),
        robustness_domains=("sentiment",),
        train=FEWSHOT_TRAIN_CONFIG,  # zoo and task finetunes alike: comparable deltas
    ),
    "small": ZooSpec(
        "small",
        ("sentiment", "biomedical", "math"),
        parts=2,
        train_size=128,
        train=TrainConfig(max_steps=4, max_length=128),
    ),
}


class Zoo:
    """Builds and holds one zoo: ``Zoo("small").build()`` -> ``ModelIndex``."""

    def __init__(
        self,
        spec: str | ZooSpec = "small",
        base: str | Path | BaseLM = DEFAULT_BASE,
        root: str | Path | None = None,
        progress: bool = True,
        splits: dict[str, DomainSplits] | None = None,
    ):
        """``splits`` supplies domains' data directly (own datasets); others come from ``load_domain``."""
        if isinstance(spec, str):
            if spec not in ZOO_SPECS:
                raise ValueError(f"unknown zoo {spec!r}; known: {', '.join(ZOO_SPECS)}")
            spec = ZOO_SPECS[spec]
        self.spec = spec
        self.base = resolve_base(base)
        self.root = Path(root) if root else cache_dir("zoo", f"{spec.name}-{self.base.fingerprint.id}")
        self.progress = progress
        self._splits: dict[str, DomainSplits] = dict(splits or {})

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    def adapter_dir(self, member: ZooMember) -> Path:
        return self.root / "adapters" / member.id

    def splits(self, domain: str) -> DomainSplits:
        if domain not in self._splits:
            self._splits[domain] = load_domain(domain, seed=self.spec.seed)
        return self._splits[domain]

    def training_records(self, member: ZooMember) -> list[Record]:
        """``train_size`` records of the member's third; a mixture takes half from each domain."""
        share = self.spec.train_size // len(member.domains)
        records = []
        for domain in member.domains:
            third = self.splits(domain).train[member.part]
            if len(third) < share:
                logger.warning("%s third %d: %d records, wanted %d", domain, member.part, len(third), share)
            records += third[:share]
        return records

    def build(self) -> ModelIndex:
        """Train missing members, embed all, save and return the index (tags: domain, kind, ...)."""
        members = self.spec.members()
        timings: dict[str, float] = {}
        for n, member in enumerate(members, 1):
            clock = time.perf_counter()
            trainer = LoraTrainer(self.base, self.spec.train_config(member), progress=self.progress)
            records = self.training_records(member)
            data = {
                "domains": list(member.domains),
                "part": member.part,
                "sources": {d: _provenance(self.splits(d).manifest) for d in member.domains},
            }
            trainer.fit(records, self.adapter_dir(member), data=data)
            timings[member.id] = time.perf_counter() - clock
            logger.info("[%d/%d] %s ready (%.1fs)", n, len(members), member.id, timings[member.id])
        embedder = DeltaEmbedder(self.base, progress=self.progress)
        embeddings = embedder.embed([self.adapter_dir(m) for m in members], [m.id for m in members])
        index = self.load_index() if ModelIndex.exists(self.index_dir) else ModelIndex()
        for stale in set(index.model_ids()) - {m.id for m in members}:
            index.remove(stale)
        for member, embedding in zip(members, embeddings, strict=True):  # append what changed
            known = member.id in index and index.get(member.id).embedding.content_hash
            if known != embedding.content_hash:
                index.add(embedding, tags=member.tags(), replace=True)
        index.save(self.index_dir)
        return index

    def load_index(self) -> ModelIndex:
        return ModelIndex.load(self.index_dir, migrate=True)  # our own cache: convert it in place


def _provenance(manifest: dict) -> dict:
    return {key: manifest.get(key) for key in ("package", "version", "wheel_sha256", "seed")}
