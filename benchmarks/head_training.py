"""Training a task head: the frozen blocks run once per example vs every block in every epoch.

``build``'s task head (``merging.build.TASK_HEAD_CONFIG``) is a LoRA of the last 2 blocks trained for
20 epochs on the task's examples. The trainer computes what the frozen blocks make of each example
once (``training.prefix.FrozenPrefix``) and runs only the trained blocks per step; the baseline runs
the whole model every step (the cache turned off). Same examples, same config, in one run; prints a
table with the speed-up and both final losses (equal up to float rounding).

    DELTA_ROUTER_HOME=... python benchmarks/head_training.py [--task bioasq] [--examples 20]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date

import torch

from delta_router.data import load_domain
from delta_router.merging.build import TASK_HEAD_CONFIG
from delta_router.models.base import DEFAULT_BASE, resolve_base
from delta_router.training import prefix
from delta_router.training.trainer import LoraTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", action="append", help="domains or unseen tasks (default: bioasq sciq)")
    parser.add_argument("--examples", type=int, default=20)
    args = parser.parse_args()
    base = resolve_base(DEFAULT_BASE)
    print(f"# head_training  {date.today()}  {platform.machine()}  {torch.get_num_threads()} threads")
    print("| task | examples | every block s | frozen blocks once s | speed-up | final loss (both) |")
    print("|---|---|---|---|---|---|")
    cache = prefix.PREFIX_CACHE_BYTES
    for task in args.task or ["bioasq", "sciq"]:
        # the unseen suite's examples: after its 200 held-out records
        records = load_domain(task, seed=0, test_size=200, fewshot_size=args.examples, train_cap=1).fewshot
        seconds, losses = {}, {}
        for label, budget in (("baseline", 0), ("cached", cache)):
            prefix.PREFIX_CACHE_BYTES = budget
            with tempfile.TemporaryDirectory() as tmp:
                clock = time.perf_counter()
                run = LoraTrainer(base, TASK_HEAD_CONFIG, progress=False).fit(records, f"{tmp}/head")
                seconds[label], losses[label] = time.perf_counter() - clock, run.final_loss
        prefix.PREFIX_CACHE_BYTES = cache
        ratio = seconds["baseline"] / seconds["cached"]
        cells = [task, len(records), f"{seconds['baseline']:.1f}", f"{seconds['cached']:.1f}",
                 f"{ratio:.1f}x", f"{losses['baseline']:.4f} / {losses['cached']:.4f}"]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
