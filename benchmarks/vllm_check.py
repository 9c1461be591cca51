"""The vLLM backend, checked on a GPU: greedy outputs against the PEFT backend, and throughput.

Both backends serve the same LoRA adapters on the same GPU. N routed requests (the zoo's held-out
queries, each sent to the adapter the zoo's router picks) are generated greedily (32 new tokens) by
each; the script prints how many outputs are identical and the first that differs. Then throughput
and latency with 1, 8 and 64 requests in flight (a new request is admitted as soon as one finishes;
the same continuous-batch interface the server's scheduler drives). Needs ``pip install vllm`` and
a CUDA GPU; sized to run in under 5 minutes.

    python benchmarks/vllm_check.py                 # the full zoo (built with `zoo build --zoo full`)
    python benchmarks/vllm_check.py --random 8      # no zoo: a random Llama and 8 random adapters
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import torch

from delta_router.model_ids import BASE_ADAPTER
from delta_router.models.base import resolve_base
from delta_router.serving.backends import GenerationRequest, PeftBackend, VllmBackend


def zoo_requests(zoo_name: str, n: int, max_tokens: int):
    """The zoo's base and adapters, and ``n`` held-out queries routed by the zoo's router."""
    from delta_router import Zoo
    from delta_router.routing.router import Router, query_text

    zoo = Zoo(zoo_name, progress=False)
    members = [m for m in zoo.spec.members() if m.kind == "domain"]
    adapters = {m.id: zoo.adapter_dir(m) for m in members}
    hf = PeftBackend(zoo.base, {}, max_loaded=1)
    router = Router.fit_zoo(zoo, hf.encoder())
    domains = zoo.spec.domains
    records = [zoo.splits(domains[i % len(domains)]).test[i // len(domains)] for i in range(n)]
    decisions = router.route(hf.encoder(**router.encoder_options), [query_text(r) for r in records])
    requests = [GenerationRequest(r.prompt(), d.adapters[0] if d.adapters else BASE_ADAPTER, max_tokens)
                for r, d in zip(records, decisions, strict=True)]  # fmt: skip
    return zoo.base, adapters, requests


def random_requests(n_adapters: int, n: int, max_tokens: int, root: Path):
    """A random Llama (hidden 256, 4 layers) with ``n_adapters`` random LoRA adapters."""
    from delta_router.testing import RandomAdapterFactory, make_tiny_base

    base = resolve_base(make_tiny_base(root / "base", hidden_size=256, num_layers=4))
    factory = RandomAdapterFactory(base.path)
    adapters = {f"a{i}": factory.make(root / f"a{i}", seed=i, scale=2.0) for i in range(n_adapters)}
    ids = list(adapters)
    requests = [GenerationRequest(f"Item {i}: apple pear", ids[i % len(ids)], max_tokens) for i in range(n)]
    return base, adapters, requests


def in_flight(backend, requests: Sequence[GenerationRequest], concurrency: int) -> tuple[float, list, int]:
    """Run ``requests`` keeping ``concurrency`` in flight: (wall seconds, latencies, tokens generated)."""
    batch, waiting, started, latency, tokens = backend.decode_batch(), list(requests), {}, [], 0
    clock = time.perf_counter()
    while waiting or len(batch):
        while waiting and len(batch) < concurrency:
            request = waiting.pop(0)
            started[id(request)] = time.perf_counter()
            if (result := backend.admit(batch, request)) is not None:
                latency.append(time.perf_counter() - started[id(request)])
                tokens += result.completion_tokens
        for request, result in batch.step():
            latency.append(time.perf_counter() - started[id(request)])
            tokens += result.completion_tokens
    return time.perf_counter() - clock, sorted(latency), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="full")
    parser.add_argument("--random", type=int, metavar="N", help="no zoo: a random model with N adapters")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.random:
            base, adapters, requests = random_requests(args.random, args.queries, args.max_tokens, Path(tmp))
        else:
            base, adapters, requests = zoo_requests(args.zoo, args.queries, args.max_tokens)
        print(f"# vllm_check  {date.today()}  {platform.machine()}  {torch.cuda.get_device_name()}")
        print(f"{len(adapters)} adapters, {len(requests)} routed requests, {args.max_tokens} greedy tokens\n")
        clock = time.perf_counter()
        vllm = VllmBackend(base, adapters, max_loaded=len(adapters), gpu_memory_utilization=0.5)
        vllm.generate(requests[:1])
        print(f"vLLM engine up in {time.perf_counter() - clock:.0f} s")
        peft = PeftBackend(base, adapters, max_loaded=len(adapters), device="cuda")

        ours, theirs = peft.generate(requests), vllm.generate(requests)
        same = [a.text == b.text for a, b in zip(ours, theirs, strict=True)]
        print(f"greedy outputs identical: **{sum(same)}/{len(same)}**")
        if not all(same):
            i = same.index(False)
            print(f"first difference (request {i}, {requests[i].adapter}):\n  peft: {ours[i].text!r}\n"
                  f"  vllm: {theirs[i].text!r}")  # fmt: skip

        print(
            "\n| backend | in flight | requests/s | tokens/s | latency p50 / p95 s |\n|---|---|---|---|---|"
        )
        for name, backend in (("vllm", vllm), ("peft", peft)):
            for concurrency in (1, 8, 64):
                wall, latency, tokens = in_flight(backend, requests, concurrency)
                p95 = latency[int(0.95 * (len(latency) - 1))]
                print(f"| {name} | {concurrency} | {len(requests) / wall:.1f} | {tokens / wall:.0f} | "
                      f"{statistics.median(latency):.3f} / {p95:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
