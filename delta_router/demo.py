"""The end-to-end job behind ``make demo`` on the embedded default base.

Until the real model zoo lands, the demo builds synthetic adapter *families* on the real
SmolLM2 base (members share a random low-rank direction plus their own noise), embeds and
indexes them, then searches with held-out members: a correct search returns the query's family.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from delta_router.base import DEFAULT_BASE, BaseModel, resolve_base
from delta_router.embed import DeltaEmbedder
from delta_router.home import cache_dir
from delta_router.index import ModelIndex, SearchHit
from delta_router.testing import RandomAdapterFactory

logger = logging.getLogger(__name__)

FAMILIES = ("alpha", "beta", "gamma")
MEMBERS = 3  # indexed adapters per family; one more per family is the held-out query


@dataclass
class DemoResult:
    base: str
    index_dir: str
    seconds: dict[str, float] = field(default_factory=dict)
    queries: dict[str, list[SearchHit]] = field(default_factory=dict)

    @property
    def top1_correct(self) -> int:
        return sum(hits[0].entry.tags["family"] == fam for fam, hits in self.queries.items())


def run_demo(base: str | BaseModel = DEFAULT_BASE) -> DemoResult:
    clock = time.perf_counter()
    resolved = resolve_base(base)
    result = DemoResult(resolved.describe(), str(cache_dir("demo") / "index"))
    result.seconds["fetch base"] = time.perf_counter() - clock

    clock = time.perf_counter()
    root = cache_dir("demo", "adapters")
    factory = None
    paths, queries = {}, {}
    for f, family in enumerate(FAMILIES):
        for m in range(MEMBERS + 1):
            path = root / f"{family}-{m}"
            if not (path / "adapter_model.safetensors").exists():
                factory = factory or RandomAdapterFactory(resolved.path)
                factory.make(path, seed=1000 + 10 * f + m, scale=0.01, family=f)
            (queries if m == MEMBERS else paths)[path.name] = (family, path)
    result.seconds["make adapters"] = time.perf_counter() - clock

    clock = time.perf_counter()
    embedder = DeltaEmbedder(resolved)
    names = list(paths)
    index = ModelIndex()
    for emb in embedder.embed([paths[n][1] for n in names], names):
        index.add(emb, tags={"family": paths[emb.model_id][0], "kind": "synthetic"})
    index.save(result.index_dir)
    result.seconds["embed + index"] = time.perf_counter() - clock

    clock = time.perf_counter()
    for name, (family, path) in queries.items():
        result.queries[family] = index.search(embedder.embed_one(path, name), k=3)
    result.seconds["search"] = time.perf_counter() - clock
    logger.info("demo done: %d/%d queries top-1 correct", result.top1_correct, len(FAMILIES))
    return result
