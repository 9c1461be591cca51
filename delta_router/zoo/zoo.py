"""A model zoo: finetunes of one base on real domain data, embedded into a ``ModelIndex``.

``ZOO_SPECS`` names the zoos (``zoo.spec``, ``zoo.wild``): ``full`` (one recipe, one dataset per
domain), ``small`` (for ``make demo``) and ``wild`` (members that differ the way public finetunes
do). ``Zoo.build`` trains what is missing (everything is cached by data and config), embeds every
member and saves the index, tagged with each member's domain, kind, dataset and recipe.

Layout under ``$DELTA_ROUTER_HOME/zoo/<spec>-<base fingerprint>/``: ``adapters/<member>/`` (PEFT
adapter + ``training.json``), ``index/`` (the ``ModelIndex``), ``report/`` (``zoo report``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from delta_router.data import EXTRA_DATASETS, DomainSplits, Record, load_domain
from delta_router.embedding.embedder import DeltaEmbedder
from delta_router.errors import IndexFormatError
from delta_router.home import cache_dir
from delta_router.models.base import DEFAULT_BASE, BaseLM, resolve_base
from delta_router.search.index import ModelIndex
from delta_router.search.selector import FEWSHOT_TRAIN_CONFIG
from delta_router.training.trainer import TRAINING_FILE, LoraTrainer, TrainConfig
from delta_router.zoo.spec import ROBUSTNESS_VARIANTS, ZooMember, ZooSpec
from delta_router.zoo.wild import WILD_SPEC, WILD_TINY_SPEC

logger = logging.getLogger(__name__)


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
    "wild": WILD_SPEC,
    "wild-small": WILD_TINY_SPEC,
}
__all__ = ["ROBUSTNESS_VARIANTS", "ZOO_SPECS", "Zoo", "ZooMember", "ZooSpec"]


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
        self._held_out: set[str] | None = None

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    def adapter_dir(self, member: ZooMember) -> Path:
        return self.root / "adapters" / member.id

    def splits(self, name: str) -> DomainSplits:
        """Splits of a domain, or of an extra dataset (its test set: the records after the thirds)."""
        if name not in self._splits:
            held_out = {} if name not in EXTRA_DATASETS else {"fewshot_size": 0, "test_last": True}
            self._splits[name] = load_domain(name, seed=self.spec.seed, **held_out)
        return self._splits[name]

    def training_records(self, member: ZooMember) -> list[Record]:
        """``train_size`` records of the member's third; a mixture shares them equally between domains.

        A member of another dataset of its domain never sees a record of any domain's test split or
        few-shot pool (some datasets share files, e.g. OpenBookQA with ``science``).
        """
        share = self.spec.records_for(member) // len(member.domains)
        records = []
        for domain in member.domains:
            source = self.spec.source(member, domain)
            third = self.splits(source).train[member.part]
            if source != domain:
                held_out = self._held_out_inputs()
                third = [r for r in third if r.input not in held_out]
            if len(third) < share:
                logger.warning("%s third %d: %d records, wanted %d", source, member.part, len(third), share)
            records += third[:share]
        return records

    def _held_out_inputs(self) -> set[str]:
        if self._held_out is None:
            self._held_out = {
                r.input for d in self.spec.domains for r in (*self.splits(d).test, *self.splits(d).fewshot)
            }
        return self._held_out

    def build(self) -> ModelIndex:
        """Train missing members, embed all, save and return the index (tags: domain, kind, ...)."""
        members = self.spec.members()
        timings: dict[str, float] = {}
        for n, member in enumerate(members, 1):
            clock = time.perf_counter()
            trainer = LoraTrainer(self.base, self.spec.train_config(member), progress=self.progress)
            records = self.training_records(member)
            sources = {d: self.spec.source(member, d) for d in member.domains}
            data = {
                "domains": list(member.domains),
                "part": member.part,
                "member": member.tags(),
                "sources": {d: _provenance(self.splits(s).manifest) for d, s in sources.items()},
            }
            # a member this zoo trained with another recipe or data is retrained; anything else refused
            ours = (self.adapter_dir(member) / TRAINING_FILE).is_file()
            trainer.fit(records, self.adapter_dir(member), data=data, overwrite=ours)
            timings[member.id] = time.perf_counter() - clock
            logger.info("[%d/%d] %s ready (%.1fs)", n, len(members), member.id, timings[member.id])
        embedder = DeltaEmbedder(self.base, progress=self.progress)
        embeddings = embedder.embed([self.adapter_dir(m) for m in members], [m.id for m in members])
        index = self.load_index() if ModelIndex.exists(self.index_dir) else ModelIndex()
        for stale in set(index.model_ids()) - {m.id for m in members}:
            index.remove(stale)
        for member, embedding in zip(members, embeddings, strict=True):  # append what changed
            tags = {**member.tags(), **self.spec.train_config(member).tags()}
            known = member.id in index and index.get(member.id)
            if not known or (known.embedding.content_hash, known.tags) != (embedding.content_hash, tags):
                index.add(embedding, tags=tags, replace=True)
        index.save(self.index_dir)
        return index

    def load_index(self) -> ModelIndex:
        """The built zoo's index; a zoo not built yet is an ``IndexFormatError`` that says how to build it."""
        if not ModelIndex.exists(self.index_dir):
            raise IndexFormatError(
                f"the zoo {self.spec.name!r} is not built for the base {self.base.name} (no index at "
                f"{self.index_dir}): run `delta-router zoo build --zoo {self.spec.name}` first"
            )
        return ModelIndex.load(self.index_dir, migrate=True)  # our own cache: convert it in place


def _provenance(manifest: dict) -> dict:
    return {key: manifest.get(key) for key in ("package", "version", "wheel_sha256", "seed")}
