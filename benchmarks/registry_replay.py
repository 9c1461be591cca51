"""The live registry replayed on a real zoo: does a data-free router pick up a new domain as its
finetunes are registered, and what does abstention cost when every domain is routed?

As ``route fit --data-free --reference-zoo REF`` ships it: a data-free router over the zoo's
single-domain finetunes, mapped by the reference zoo's pairs, with its ``Background``.

- **Every domain routed**: that router over all of them; the share of every domain's test queries
  routed to a finetune of their domain, and sent to the base (by the background, by the threshold).
- **Replay**: each domain in turn is withheld (the router is fitted without its finetunes), then its
  LoRA finetunes are registered one by one through ``AdapterRegistry.register`` (the server's path:
  embedded, profiled by the router's own reference map, added to the index and the router), in the
  zoo's order. After each, the share of the withheld domain's queries routed to one of them, and to
  the base; after the last, the other domains' queries routed right (what the registrations cost
  them). Full finetunes cannot be registered (the server serves LoRA adapters): they stay out.
  The backend here only records the adapters (no generation), so DoRA finetunes, which the PEFT
  backend cannot serve per row, are replayed too.

    python benchmarks/registry_replay.py --zoo wild --reference-zoo full
    python benchmarks/registry_replay.py --zoo full --reference-zoo wild
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from delta_router import Zoo
from delta_router.errors import DeltaRouterError
from delta_router.home import atomic_write_text, refuse_existing_file
from delta_router.models.finetunes import Finetune
from delta_router.routing.data_free import fit_data_free, reference_pairs
from delta_router.routing.router import QueryEncoder, Router, query_text
from delta_router.serving.backends import AdapterSet
from delta_router.serving.registry import AdapterRegistry
from delta_router.serving.scheduler import BatchScheduler


class RoutingOnly(AdapterSet):
    """A backend that serves nothing: it records the registered adapters and encodes queries."""

    def __init__(self, encoder: QueryEncoder):
        self.adapters, self._encoder = {}, encoder

    def encoder(self, **options) -> QueryEncoder:
        return self._encoder

    def check_adapter(self, path) -> None:
        """Every LoRA adapter is accepted: this replay measures routing, not serving."""


def outcomes(router: Router, features: np.ndarray, labels: np.ndarray, domain_of: dict) -> dict:
    """Per query ``[Q]`` bool arrays: routed to a finetune of its domain, sent to the base by the
    background, by the threshold."""
    decisions = router.decide(features)
    chosen = [domain_of[d.adapters[0]] if d.adapters else None for d in decisions]
    return {
        "right": np.asarray(chosen, dtype=object) == labels,
        "background": np.asarray([d.fallback == "background" for d in decisions]),
        "threshold": np.asarray([d.fallback == "threshold" for d in decisions]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="wild")
    parser.add_argument("--reference-zoo", nargs="+", default=["full"], metavar="NAME")
    parser.add_argument("--queries", type=int, default=40, help="test records per domain to route")
    parser.add_argument("--json", metavar="FILE", help="also write the figures here")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    args = parser.parse_args()
    try:
        if args.json:
            refuse_existing_file(args.json, args.force, "--json")
    except DeltaRouterError as error:
        parser.error(str(error))
    if args.queries < 1:
        parser.error(f"--queries is a number of test records per domain >= 1, got {args.queries}")
    if args.zoo in args.reference_zoo:
        parser.error(f"--reference-zoo {args.zoo} is the routed zoo itself: give other zoos")

    zoo = Zoo(args.zoo, progress=False)
    members = [m for m in zoo.spec.members() if m.kind == "domain"]
    domain_of = {m.id: m.label for m in members}
    index = zoo.load_index().filtered(lambda entry: entry.model_id in domain_of)
    encoder = QueryEncoder.for_model(zoo.base.load_model(), zoo.base.load_tokenizer())
    deltas, reference = reference_pairs([Zoo(name, progress=False) for name in args.reference_zoo], encoder)
    queries = [(d, r) for d in zoo.spec.domains for r in zoo.splits(d).test[: args.queries]]
    labels = np.asarray([d for d, _ in queries], dtype=object)
    features = encoder([query_text(r) for _, r in queries]).numpy()
    refs = "+".join(args.reference_zoo)
    print(f"# registry_replay  {date.today()}  {platform.machine()}  {torch.get_num_threads()} threads")
    print(
        f"zoo {args.zoo} mapped by {refs}: {len(members)} single-domain finetunes, "
        f"{len(queries)} test queries\n"
    )

    routed = fit_data_free(index, deltas, reference)
    every = outcomes(routed, features, labels, domain_of)
    summary = {
        "zoo": args.zoo,
        "reference": args.reference_zoo,
        "queries": len(queries),
        "threshold": routed.threshold,
        "support": routed.background.support,
        "every_domain": {k: float(v.mean()) for k, v in every.items()},
        "replay": {},
    }
    print("## Every domain routed\n")
    print("| domain | routed right | to the base: background | threshold |\n|---|---|---|---|")
    for domain in [*zoo.spec.domains, None]:
        rows = labels == domain if domain else np.ones(len(labels), dtype=bool)
        cells = [f"{every[k][rows].mean():.1%}" for k in ("right", "background", "threshold")]
        print(f"| {domain or '**all**'} | " + " | ".join(cells) + " |")

    print("\n## Replay: each domain withheld, its LoRA finetunes then registered one by one\n")
    print(
        "| domain | registered | withheld -> base | after 1st: right / base | after all: right / base "
        "| refit: right | other domains right: before / after |"
    )
    print("|---|---|---|---|---|---|---|")
    clock = time.perf_counter()
    for domain in zoo.spec.domains:
        mine = labels == domain
        ids = [m.id for m in members if m.label == domain]
        loras = [i for i in ids if Finetune.open(index.get(i).embedding.path).kind == "lora"]
        if not loras:
            print(f"| {domain} | 0 of {len(ids)} | (no LoRA finetune to register) | | | | |")
            continue
        kept = index.filtered(lambda entry, d=domain: domain_of[entry.model_id] != d)
        router = fit_data_free(kept, deltas, reference)
        registry = AdapterRegistry(kept, BatchScheduler(RoutingOnly(encoder), router))
        before = outcomes(router, features, labels, domain_of)
        steps = []
        for model_id in loras:
            entry = index.get(model_id)
            registry.register(entry.embedding.path, model_id, entry.tags)
            after = outcomes(router, features, labels, domain_of)
            steps.append(
                {
                    "right": float(after["right"][mine].mean()),
                    "base": float((after["background"] | after["threshold"])[mine].mean()),
                }
            )
        to_base = float((before["background"] | before["threshold"])[mine].mean())
        summary["replay"][domain] = {
            "finetunes": len(ids),
            "registered": len(loras),
            "withheld_to_base": to_base,
            "steps": steps,
            "refit_right": float(every["right"][mine].mean()),
            "others_right": [float(before["right"][~mine].mean()), float(after["right"][~mine].mean())],
        }
        first, last, others = steps[0], steps[-1], summary["replay"][domain]["others_right"]
        print(
            f"| {domain} | {len(loras)} of {len(ids)} | {to_base:.0%} | {first['right']:.0%} / "
            f"{first['base']:.0%} | {last['right']:.0%} / {last['base']:.0%} | "
            f"{every['right'][mine].mean():.0%} | {others[0]:.1%} / {others[1]:.1%} |",
            flush=True,
        )
    replay = summary["replay"].values()
    means = {
        "withheld_to_base": np.mean([r["withheld_to_base"] for r in replay]),
        "first_right": np.mean([r["steps"][0]["right"] for r in replay]),
        "last_right": np.mean([r["steps"][-1]["right"] for r in replay]),
        "last_base": np.mean([r["steps"][-1]["base"] for r in replay]),
        "refit_right": np.mean([r["refit_right"] for r in replay]),
    }
    summary["replay_mean"] = {k: float(v) for k, v in means.items()}
    print(
        f"| **mean** | | {means['withheld_to_base']:.1%} | {means['first_right']:.1%} | "
        f"{means['last_right']:.1%} / {means['last_base']:.1%} | {means['refit_right']:.1%} | |"
    )
    print(f"\nreplay: {time.perf_counter() - clock:.0f}s")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
