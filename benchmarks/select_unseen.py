"""What each selection method picks for the unseen-task suite, and how good the picks are there.

For every task of the suite already run (`make unseen` / `delta-router compare --suite unseen`),
ranks the index's finetunes from the task's 20 examples by the paper's task LoRA (`finetune`) and
by what the examples ask (`queries`, with profiles from the zoo's training prompts and data-free
ones), and scores each method's top-k by the suite's screen of every finetune (its first 50
held-out records, read from the suite's cache; nothing is scored here). Prints one table per
task: the picks, their mean accuracy and mean probability of the gold choice, next to the mean over
all finetunes (what random picks get on average) and the best one.

    DELTA_ROUTER_HOME=... python benchmarks/select_unseen.py [--zoo full] [--task sciq ...]
"""

from __future__ import annotations

import argparse
import platform
from datetime import date

import numpy as np
import torch

from delta_router import Zoo
from delta_router.data import load_domain
from delta_router.experiments.unseen import UNSEEN_SUITE, HeldOutScorer, SuiteConfig, single
from delta_router.models.finetunes import Finetune
from delta_router.routing.data_free import fit_data_free, reference_pairs
from delta_router.routing.router import QueryEncoder
from delta_router.search.selector import TaskSelector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="full")
    parser.add_argument("--task", action="append", help="suite task (default: every one already run)")
    parser.add_argument("-k", "--k", type=int, default=3)
    args = parser.parse_args()
    config = SuiteConfig()
    zoo = Zoo(args.zoo, progress=False)
    index = zoo.load_index()
    finetune = TaskSelector(index, progress=False)
    encoder = QueryEncoder.for_model(finetune.embedder.model, finetune.embedder.tokenizer)
    deltas, trained = reference_pairs(zoo, encoder)
    selectors = {
        "finetune (paper)": finetune,
        "queries, profiles from training prompts": TaskSelector(
            index, "queries", embedder=finetune.embedder, router=trained, progress=False
        ),
        "queries, data-free profiles": TaskSelector(
            index, "queries", embedder=finetune.embedder, router=fit_data_free(index, deltas, trained),
            progress=False,
        ),
    }  # fmt: skip
    finetunes = {m: Finetune.open(index.get(m).embedding.path, m) for m in index.model_ids()}
    print(f"# select_unseen  {date.today()}  {platform.machine()}  {torch.get_num_threads()} threads")
    print(f"zoo {args.zoo}: {len(index)} finetunes; top-{args.k} scored by the suite's screen "
          f"({config.screen} held-out records)\n")  # fmt: skip
    summary: dict[str, list[float]] = {name: [] for name in [*selectors, "all finetunes (random)"]}
    for task in args.task or UNSEEN_SUITE:
        splits = load_domain(task, seed=config.seed, test_size=config.held_out,
                             fewshot_size=config.examples, train_cap=1)  # fmt: skip
        scorer = HeldOutScorer(None, task, splits.test)
        screen = {m: scorer.cached(single(ft), limit=config.screen) for m, ft in finetunes.items()}
        if any(s is None for s in screen.values()):
            print(f"{task}: not screened yet (run the suite on it first); skipped\n")
            continue
        accuracy = {m: float(s.correct.mean()) for m, s in screen.items()}
        gold = {m: float(s.gold_prob.mean()) for m, s in screen.items()}
        best = max(accuracy, key=accuracy.get)
        print(f"## {task}\n\n| method | top-{args.k} | accuracy | p(gold) |\n|---|---|---|---|")
        for name, selector in selectors.items():
            picks = selector.select(splits.fewshot[: config.examples], k=args.k).model_ids
            acc = float(np.mean([accuracy[m] for m in picks]))
            summary[name].append(acc)
            print(f"| {name} | {', '.join(picks)} | {acc:.3f} | {np.mean([gold[m] for m in picks]):.3f} |")
        summary["all finetunes (random)"].append(float(np.mean(list(accuracy.values()))))
        print(f"| all finetunes (random) | - | {np.mean(list(accuracy.values())):.3f} "
              f"| {np.mean(list(gold.values())):.3f} |")  # fmt: skip
        print(f"| best single | {best} | {accuracy[best]:.3f} | {gold[best]:.3f} |\n")
    print("## mean over tasks\n\n| method | accuracy of the picks |\n|---|---|")
    for name, values in summary.items():
        if values:
            print(f"| {name} | {np.mean(values):.3f} ({len(values)} tasks) |")


if __name__ == "__main__":
    main()
