"""Multiple-choice scoring: every (prompt, choice) sequence on its own vs prompts shared by their choices.

``evaluation.scoring.choice_logprobs`` runs a record's prompt once and its choices on copies of the
prompt's KV cache; the baseline is ``sequence_logprobs`` over every (prompt, choice) sequence, the
scorer before. Both on the same records of the default base, in one run; prints a table with the
speed-up and the largest difference of the log-probabilities.

    DELTA_ROUTER_HOME=... python benchmarks/score_throughput.py [--records 40] [--domain science ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from delta_router.data import load_domain
from delta_router.data.sequences import encode
from delta_router.evaluation.scoring import choice_logprobs, sequence_logprobs
from delta_router.models.base import DEFAULT_BASE, resolve_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=40)
    parser.add_argument("--domain", action="append", help="domains or unseen tasks (default: 4 of them)")
    args = parser.parse_args()
    base = resolve_base(DEFAULT_BASE)
    model, tokenizer = base.load_model(), base.load_tokenizer()
    pad = tokenizer.pad_token_id
    print("| records | choices | baseline s | shared-prompt s | speed-up | max abs diff |")
    print("|---|---|---|---|---|---|")
    for name in args.domain or ["science", "sentiment", "sciq", "boolq"]:
        records = load_domain(name).test[: args.records]
        seqs = [[encode(tokenizer, r.prompt(), c, 256) for c in r.choices] for r in records]
        clock = time.perf_counter()
        baseline = sequence_logprobs(model, [s for group in seqs for s in group], pad)
        baseline_s = time.perf_counter() - clock
        clock = time.perf_counter()
        shared = torch.cat(choice_logprobs(model, seqs, pad))
        shared_s = time.perf_counter() - clock
        diff = float((shared - baseline).abs().max())
        choices = sum(len(r.choices) for r in records) / len(records)
        print(
            f"| {name} x{len(records)} | {choices:.1f} | {baseline_s:.1f} | {shared_s:.1f} | "
            f"{baseline_s / shared_s:.2f}x | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()
