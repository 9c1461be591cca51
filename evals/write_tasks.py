"""Export lm-eval task configs (YAML + JSONL) for the built-in domains' held-out splits.

The configs read local JSONL by absolute path, so they are generated per machine, not committed:

    python evals/write_tasks.py evals/tasks            # then: lm_eval --include_path evals/tasks ...
"""

from __future__ import annotations

import argparse

from delta_router.data import DOMAINS, load_domain
from delta_router.evaluation.harness import write_tasks

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--domain", action="append", help="default: every built-in domain")
    parser.add_argument("--size", type=int, default=300, help="test records per domain")
    args = parser.parse_args()
    held_out = {d: load_domain(d).test[: args.size] for d in args.domain or sorted(DOMAINS)}
    print(write_tasks(held_out, args.out_dir))
