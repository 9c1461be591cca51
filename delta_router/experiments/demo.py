"""The end-to-end job behind ``make demo`` on the embedded default base.

Builds the ``small`` zoo (real finetunes of SmolLM2 on real domain data: 3 domains x 2 training
thirds), embeds and indexes it, reports how it clusters, then asks the index for each finetune's
nearest neighbour: a working embedding finds the other finetune of the same domain. Then the
headline flow: 20 examples of one domain -> the selected finetunes merged into one model
(``delta-router build``), and a router that sends one held-out query per domain to a finetune.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from delta_router.home import cache_dir
from delta_router.merging.build import BuildResult, build_merged_model
from delta_router.models.base import DEFAULT_BASE, BaseLM, resolve_base
from delta_router.routing.router import QueryEncoder, RouteDecision, Router, query_text
from delta_router.search.index import SearchHit
from delta_router.zoo.report import ZooReport, build_report
from delta_router.zoo.zoo import Zoo

logger = logging.getLogger(__name__)


@dataclass
class DemoResult:
    base: str
    index_dir: str
    report: ZooReport
    seconds: dict[str, float] = field(default_factory=dict)
    domains: dict[str, str] = field(default_factory=dict)  # model id -> its domain
    queries: dict[str, list[SearchHit]] = field(default_factory=dict)  # model id -> its neighbours
    build: BuildResult | None = None  # 20 examples of the first domain -> merged model
    routes: dict[str, RouteDecision] = field(default_factory=dict)  # domain -> one held-out query's route

    @property
    def top1_correct(self) -> int:
        return sum(hits[0].entry.tags["domain"] == self.domains[q] for q, hits in self.queries.items())


def run_demo(base: str | BaseLM = DEFAULT_BASE, zoo: str = "small", eval_size: int = 16) -> DemoResult:
    clock = time.perf_counter()
    resolved = resolve_base(base)
    seconds = {"fetch base": time.perf_counter() - clock}

    clock = time.perf_counter()
    built = Zoo(zoo, resolved)
    index = built.build()
    seconds["build zoo (train + embed + index)"] = time.perf_counter() - clock

    clock = time.perf_counter()
    report = build_report(built, eval_size=eval_size)
    seconds["report (clustering + held-out scores)"] = time.perf_counter() - clock

    result = DemoResult(resolved.describe(), str(built.index_dir), report, seconds)
    for entry in index.list():
        result.domains[entry.model_id] = entry.tags["domain"]
        result.queries[entry.model_id] = index.search(entry.embedding, k=3, exclude={entry.model_id})
    logger.info("demo: %d/%d finetunes find their domain first", result.top1_correct, len(result.queries))

    domain = built.spec.domains[0]
    clock = time.perf_counter()
    result.build = build_merged_model(
        built.splits(domain).fewshot[:20], index, cache_dir("demo") / f"merged-{domain}",
        k=min(2, len(index)), force=True,
    )  # fmt: skip
    seconds[f"build: 20 {domain} examples -> merged model"] = time.perf_counter() - clock

    clock = time.perf_counter()
    encoder = QueryEncoder.for_model(resolved.load_model(), resolved.load_tokenizer())
    router = Router.fit_zoo(built, encoder)
    texts = {d: query_text(built.splits(d).test[0]) for d in built.spec.domains}
    result.routes = dict(zip(texts, router.route(encoder, list(texts.values())), strict=True))
    seconds["route: fit profiles + one query per domain"] = time.perf_counter() - clock
    return result
