"""Why evals run in fp32: lm-eval scoring in fp32 vs bf16 (time, answers that change, weight rounding).

For each zoo domain, the base and the domain's first finetune (folded into the weights, as
``compare`` scores it) are scored on the same held-out records in fp32 and with the same weights
cast to bf16, in the same run. The table gives the wall times and their ratio, how many
multiple-choice answers (argmax over the choices) change, and the median change of an answer's
log-likelihood. The second table shows why: a LoRA delta is a fraction of a percent of the weights
it is added to, below bf16's resolution, so rounding the folded weights perturbs them by about as
much as the finetune changed them.

    python benchmarks/eval_precision.py                        # full zoo, 40 records per domain
    python benchmarks/eval_precision.py --domain sentiment --limit 20
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from datetime import date

import numpy as np
import torch

from delta_router import Zoo
from delta_router.evaluation.harness import LmEvaluator, load_for_eval, task_name, write_tasks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def answers(model, tokenizer, evaluator: LmEvaluator, task: str) -> tuple[float, list[list[float]]]:
    """(seconds, per document the log-likelihood of each choice or of the one answer)."""
    clock = time.perf_counter()
    out = evaluator.run(model, tokenizer, [task], log_samples=True)
    seconds = time.perf_counter() - clock
    return seconds, [[float(r[0]) for r in s["filtered_resps"]] for s in out["samples"][task]]


def rounding(base, finetuned) -> tuple[float, float]:
    """Medians over changed weight matrices: |delta| / |W| and |bf16(W + delta) - (W + delta)| / |delta|."""
    ratios, errors = [], []
    base_params = dict(base.named_parameters())
    for name, tuned in finetuned.named_parameters():
        delta = tuned.detach() - base_params[name].detach()
        if tuned.dim() != 2 or not delta.any():
            continue
        ratios.append(float(delta.norm() / base_params[name].norm()))
        errors.append(float((tuned.detach().bfloat16().float() - tuned.detach()).norm() / delta.norm()))
    return float(np.median(ratios)), float(np.median(errors))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="full")
    parser.add_argument("--domain", action="append", help="domains (default: all of the zoo)")
    parser.add_argument("--limit", type=int, default=40, help="records per domain")
    args = parser.parse_args()

    zoo = Zoo(args.zoo, progress=False)
    base, tokenizer = load_for_eval("base", zoo.base)
    print(f"# eval_precision  {date.today()}  {platform.machine()}  {torch.get_num_threads()} threads")
    print(f"zoo {args.zoo}, {args.limit} held-out records per domain; base and <domain>-0, folded\n")
    print("| domain | model | fp32 s | bf16 s | speed-up | choices changed | median change of log-lik |")
    print("|---|---|---|---|---|---|---|")
    totals, weight_rows = {name: 0.0 for name in DTYPES}, []
    for domain in args.domain or zoo.spec.domains:
        task = task_name(domain)
        evaluator = LmEvaluator(
            write_tasks({domain: zoo.splits(domain).test[: args.limit]}), limit=args.limit
        )
        finetune = zoo.root / "adapters" / f"{domain}-0"
        tuned, _ = load_for_eval(finetune, zoo.base)
        weight_rows.append((f"{domain}-0", *rounding(base, tuned)))
        for label, model in (("base", base), (f"{domain}-0", tuned)):
            seconds, lls = {}, {}
            for name, dtype in DTYPES.items():  # a cast copy: fp32 -> bf16 -> fp32 would keep the rounding
                cast = model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)
                seconds[name], lls[name] = answers(cast, tokenizer, evaluator, task)
                totals[name] += seconds[name]
            pairs = list(zip(lls["fp32"], lls["bf16"], strict=True))
            changes = np.abs([x - y for a, b in pairs for x, y in zip(a, b, strict=True)])
            choice = [(a, b) for a, b in pairs if len(a) > 1]
            flips = f"{sum(np.argmax(a) != np.argmax(b) for a, b in choice)}/{len(choice)}" if choice else "-"
            ratio = seconds["fp32"] / seconds["bf16"]
            print(f"| {domain} | {label} | {seconds['fp32']:.1f} | {seconds['bf16']:.1f} | {ratio:.2f}x "
                  f"| {flips} | {np.median(changes):.3f} nats |", flush=True)  # fmt: skip
    ratio = totals["fp32"] / totals["bf16"]
    print(f"| **all** | | {totals['fp32']:.1f} | {totals['bf16']:.1f} | {ratio:.2f}x | | |\n")
    print("| finetune | median abs(delta) / abs(W) | median bf16 rounding of W + delta / abs(delta) |")
    print("|---|---|---|")
    for name, share, error in weight_rows:
        print(f"| {name} | {100 * share:.2f}% | {100 * error:.0f}% |")


if __name__ == "__main__":
    main()
