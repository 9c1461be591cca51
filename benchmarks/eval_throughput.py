"""lm-eval scoring time per held-out split: HFLM (one pass per choice) vs SharedContextHFLM.

Both score the base model on the same records of each zoo domain, in the same run and process,
alternating (HFLM, shared, HFLM, shared, ...) so background load hits both alike; the table gives
the best of ``--repeats`` wall times, the ratio, and whether the metrics agree.

    python benchmarks/eval_throughput.py                      # full zoo, 40 records per domain
    python benchmarks/eval_throughput.py --domain legal --limit 20
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date

import torch

from delta_router import Zoo
from delta_router.evaluation.harness import LmEvaluator, load_for_eval, task_name, write_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="full")
    parser.add_argument("--domain", action="append", help="domains (default: all of the zoo)")
    parser.add_argument("--limit", type=int, default=40, help="records per domain")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    zoo = Zoo(args.zoo, progress=False)
    model, tokenizer = load_for_eval("base", zoo.base)
    print(f"# eval_throughput  {date.today()}  {platform.machine()}  {torch.get_num_threads()} threads")
    print(f"zoo {args.zoo}, base model, {args.limit} held-out records per domain, best of {args.repeats}\n")
    print("| domain | HFLM s | shared-context s | speed-up | same metrics |")
    print("|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for domain in args.domain or zoo.spec.domains:
        task = task_name(domain)
        tasks_dir = write_tasks({domain: zoo.splits(domain).test[: args.limit]})
        evaluators = {
            "hflm": LmEvaluator(tasks_dir, limit=args.limit, shared_context=False),
            "shared": LmEvaluator(tasks_dir, limit=args.limit, shared_context=True),
        }
        times: dict[str, list[float]] = {name: [] for name in evaluators}
        metrics = {}
        for _ in range(args.repeats):
            for name, evaluator in evaluators.items():
                clock = time.perf_counter()
                metrics[name] = evaluator.evaluate(model, tokenizer, [task])[task]
                times[name].append(time.perf_counter() - clock)
        best = [min(times["hflm"]), min(times["shared"])]
        totals = [t + b for t, b in zip(totals, best, strict=True)]
        same = all(abs(metrics["hflm"][k] - metrics["shared"][k]) < 1e-6 * max(1.0, abs(metrics["hflm"][k]))
                   for k in metrics["hflm"])  # fmt: skip
        print(f"| {domain} | {best[0]:.1f} | {best[1]:.1f} | {best[0] / best[1]:.2f}x | {same} |", flush=True)
    print(f"| **all** | {totals[0]:.1f} | {totals[1]:.1f} | {totals[0] / totals[1]:.2f}x | |")


if __name__ == "__main__":
    main()
