"""Retrieval accuracy of TaskSelector on the real zoo, and the wall time of each `build` stage.

Queries: for every domain of the zoo, disjoint 20-example sets from its few-shot pool (held out
from every finetune). A query is correct when the top-1 finetune (among single-domain finetunes)
has the query's domain. Both selection methods run on the same queries, so their accuracies are
comparable; the few-shot finetunes are cached, so a rerun only redoes the search.

    python benchmarks/select_retrieval.py                       # full zoo, 5 queries per domain
    python benchmarks/select_retrieval.py --zoo small --per-domain 2
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import torch

from delta_router import Merger, TaskSelector, Zoo
from delta_router.search.selector import INDEX_METHODS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="full")
    parser.add_argument("--per-domain", type=int, default=5, help="20-example queries per domain")
    parser.add_argument("--examples", type=int, default=20)
    parser.add_argument("--build-offset", type=int, default=0, help="first test record of the timed task")
    args = parser.parse_args()

    zoo = Zoo(args.zoo, progress=False)
    index = zoo.load_index().filtered(lambda e: e.tags.get("kind") != "mixture")  # one right domain
    print(f"# select_retrieval  {date.today()}  {platform.machine()}  {torch.get_num_threads()} threads")
    print(f"zoo {args.zoo}: {len(index)} single-domain finetunes; {args.per_domain} queries x "
          f"{len(zoo.spec.domains)} domains, {args.examples} examples each\n")  # fmt: skip

    correct: dict[str, dict[str, list[bool]]] = {m: defaultdict(list) for m in INDEX_METHODS}
    top3: dict[str, list[bool]] = {m: [] for m in INDEX_METHODS}
    seconds: dict[str, list[float]] = defaultdict(list)
    print("| domain | query | method | top-1 | top-3 domains | top-1 cosine |")
    print("|---|---|---|---|---|---|")
    for domain in zoo.spec.domains:
        pool = zoo.splits(domain).fewshot
        for q in range(args.per_domain):
            examples = pool[q * args.examples : (q + 1) * args.examples]
            for method in INDEX_METHODS:
                selection = TaskSelector(index, method=method, progress=False).select(examples, k=3)
                domains = [h.entry.tags["domain"] for h in selection.hits]
                correct[method][domain].append(domains[0] == domain)
                top3[method].append(domain in domains)
                for stage, s in selection.seconds.items():
                    seconds[f"{method}: {stage}"].append(s)
                print(f"| {domain} | {q} | {method} | {selection.hits[0].model_id} | {', '.join(domains)} "
                      f"| {selection.hits[0].score:.3f} |", flush=True)  # fmt: skip

    print("\n| domain | " + " | ".join(f"top-1 {m}" for m in INDEX_METHODS) + " |")
    print("|---|" + "---|" * len(INDEX_METHODS))
    for domain in zoo.spec.domains:
        cells = [f"{sum(correct[m][domain])}/{len(correct[m][domain])}" for m in INDEX_METHODS]
        print(f"| {domain} | " + " | ".join(cells) + " |")
    for method in INDEX_METHODS if args.per_domain else ():
        hits = [c for per in correct[method].values() for c in per]
        near = top3[method]
        print(f"\n{method}: top-1 {sum(hits)}/{len(hits)} = {sum(hits) / len(hits):.0%}, "
              f"top-3 {sum(near)}/{len(near)} = {sum(near) / len(near):.0%}")  # fmt: skip

    # one `build` end to end, timed by stage (the selection above is cached: time a fresh task)
    examples = zoo.splits(zoo.spec.domains[0]).test[args.build_offset : args.build_offset + args.examples]
    clock = time.perf_counter()
    selection = TaskSelector(index, progress=False).select(examples, k=3)
    select_s = time.perf_counter() - clock
    with tempfile.TemporaryDirectory() as tmp:
        clock = time.perf_counter()
        Merger(zoo.base, "ties", progress=False).merge(
            [h.entry.embedding.path for h in selection.hits], Path(tmp) / "merged"
        )
        merge_s = time.perf_counter() - clock
    print("\n| build stage | seconds |\n|---|---|")
    for stage, s in selection.seconds.items():
        print(f"| {stage} | {s:.1f} |")
    print(f"| merge (ties, k=3, incl. materialising LoRAs) | {merge_s:.1f} |")
    print(f"| total | {select_s + merge_s:.1f} |")
    if args.per_domain:
        print(
            "\nmean seconds per query: " + ", ".join(f"{k} {sum(v) / len(v):.1f}" for k, v in seconds.items())
        )


if __name__ == "__main__":
    main()
