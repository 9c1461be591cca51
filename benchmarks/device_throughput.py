"""Eval and embedding speed of a base-shaped model on any device (for GPU users), in one run.

Timing does not depend on the weights, so the model is a random one of the base's architecture
(its ``config.json`` and tokenizer): the benchmark runs where the base's weights are not at hand
(a GPU box without the GGUF). It reports, for each lm-eval task directory given (``write_tasks``
output, e.g. ``$DELTA_ROUTER_HOME/evals/tasks/*``), the time of lm-eval's HFLM and of
``SharedContextHFLM`` (best of 2, after a warm-up), and the Delta-Activation embedding rate of N
random r=8 adapters with the default ``adapters_per_batch`` for the device.

    python benchmarks/device_throughput.py --config BASE_DIR --tasks $DELTA_ROUTER_HOME/evals/tasks/* \\
        --device cuda --limit 40 --adapters 64
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date
from functools import partial
from pathlib import Path

import torch

from delta_router import DeltaEmbedder
from delta_router.evaluation.harness import LmEvaluator
from delta_router.testing import RandomAdapterFactory


def random_base(config_dir: Path, out_dir: Path) -> Path:
    """A randomly initialised model of ``config_dir``'s architecture, with its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out_dir)
    return out_dir


def seconds(fn, repeats: int = 2) -> float:
    fn()  # warm-up (kernels, allocator, lm-eval's dataset cache)
    best = float("inf")
    for _ in range(repeats):
        clock = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - clock)
    return best


def eval_table(model, tokenizer, task_dirs: list[Path], limit: int) -> None:
    print(f"lm-eval, {limit} records per task, best of 2\n")
    print("| task | HFLM s | shared-context s | speed-up |")
    print("|---|---|---|---|")
    totals = [0.0, 0.0]
    for tasks_dir in task_dirs:
        evaluators = (
            LmEvaluator(tasks_dir, limit=limit, shared_context=False),
            LmEvaluator(tasks_dir, limit=limit, shared_context=True),
        )
        (task,) = evaluators[0].tasks  # one task per directory: write_tasks({domain: records})
        times = [seconds(partial(e.evaluate, model, tokenizer, [task])) for e in evaluators]
        totals = [t + s for t, s in zip(totals, times, strict=True)]
        print(f"| {task} | {times[0]:.2f} | {times[1]:.2f} | {times[0] / times[1]:.2f}x |", flush=True)
    print(f"| **all** | {totals[0]:.2f} | {totals[1]:.2f} | {totals[0] / totals[1]:.2f}x |\n")


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, required=True, help="a base model directory (config + tokenizer)"
    )
    parser.add_argument("--tasks", type=Path, nargs="*", default=[], help="lm-eval task directories")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--limit", type=int, default=40)
    parser.add_argument("--adapters", type=int, default=64)
    args = parser.parse_args()

    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine()
    print(f"# device_throughput  {date.today()}  {name}  torch {torch.__version__}\n")
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = random_base(args.config, Path(tmp) / "base")
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(args.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        if args.tasks:
            eval_table(model, tokenizer, args.tasks, args.limit)
        del model

        factory = RandomAdapterFactory(base_dir, r=8, alpha=16)
        adapters = [factory.make(Path(tmp) / f"a{i}", seed=i, scale=0.01) for i in range(args.adapters)]
        embedder = DeltaEmbedder(base_dir, device=args.device, cache=False, progress=False)
        rate = args.adapters / seconds(lambda: embedder.transform(adapters), repeats=1)
        print(f"Delta Activations: {rate:.1f} adapters/s ({args.adapters} random r=8 adapters, "
              f"adapters_per_batch {embedder.adapters_per_batch})")  # fmt: skip


if __name__ == "__main__":
    main()
