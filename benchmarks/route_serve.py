"""Serving costs on the real zoo: routing overhead, mixed-adapter batching, and a loopback load test.

1. Routing overhead: the router's base forward for one query vs. a 32-token generation with the
   chosen adapter (target: <= 20%).
2. Mixed-adapter batching: 8 requests for 8 different adapters as one batched ``generate`` vs. one
   request at a time, 32 new tokens each (target: >= 3x throughput); also 8 requests of one
   adapter in one batch, to separate the per-row LoRA cost from batching itself.
3. Load test: uvicorn on 127.0.0.1, 200 requests from 8 concurrent clients, mixed domains
   (``auto`` and pinned adapters), 1 in 10 malformed: server errors, 4xx answers, p50/p95 latency.
   Meanwhile one more client registers and removes adapters (``POST``/``DELETE /v1/adapters``,
   data-free profiles) in a loop, and some requests are pinned to the adapter that comes and goes.
4. Latency p50/p95 and throughput at 1, 8 and 32 concurrent requests (``--sweep``).

    python benchmarks/route_serve.py            # full zoo (built by `delta-router zoo build --zoo full`)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import platform
import random
import socket
import statistics
import threading
import time
from datetime import date

import httpx
import torch

from delta_router import Zoo
from delta_router.routing.router import Router, query_text
from delta_router.serving.app import create_app
from delta_router.serving.backends import GenerationRequest, PeftBackend
from delta_router.serving.registry import AdapterRegistry
from delta_router.serving.scheduler import BatchScheduler


def timed(fn, repeats: int = 3) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        clock = time.perf_counter()
        fn()
        times.append(time.perf_counter() - clock)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="full")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16, help="per load-test request")
    parser.add_argument("--sweep", type=int, nargs="+", default=[1, 8, 32], help="concurrency levels")
    parser.add_argument("--sweep-requests", type=int, default=32, help="requests per concurrency level")
    args = parser.parse_args()
    rng = random.Random(0)

    zoo = Zoo(args.zoo, progress=False)
    members = [m for m in zoo.spec.members() if m.kind == "domain"]
    backend = PeftBackend(zoo.base, {m.id: zoo.adapter_dir(m) for m in members}, max_loaded=len(members))
    router = Router.fit_zoo(zoo, backend.encoder())
    encoder = backend.encoder(**router.encoder_options)
    tests = {d: zoo.splits(d).test for d in zoo.spec.domains}
    print(f"# route_serve  {date.today()}  {platform.machine()}  {torch.get_num_threads()} threads")
    print(f"zoo {args.zoo}: {len(members)} adapters, PEFT backend on CPU\n")

    # 1. routing overhead vs a 32-token generation ---------------------------------------------
    record = tests[zoo.spec.domains[0]][0]
    [decision] = router.route(encoder, [query_text(record)])
    # exactly 32 new tokens (EOS ignored until then), so latencies compare like for like
    request = GenerationRequest(record.prompt(), decision.adapters[0], max_tokens=32, min_tokens=32)
    route_s = timed(lambda: router.route(encoder, [query_text(record)]))
    generate_s = timed(lambda: backend.generate([request]))
    print("| step | seconds |\n|---|---|")
    print(f"| route one query (base forward) | {route_s:.3f} |")
    print(f"| generate 32 tokens (routed adapter) | {generate_s:.3f} |")
    print(f"| overhead | **{route_s / generate_s:.1%}** |\n")

    # 2. one mixed-adapter batch vs one request at a time -----------------------------------------
    picks = rng.sample(members, 8)
    batch = [GenerationRequest(tests[m.label][1].prompt(), m.id, max_tokens=32, min_tokens=32) for m in picks]
    batched_s = timed(lambda: backend.generate(batch), repeats=2)
    one_adapter = [GenerationRequest(r.prompt, batch[0].adapter, 32, min_tokens=32) for r in batch]
    same_s = timed(lambda: backend.generate(one_adapter), repeats=2)
    serial_s = timed(lambda: [backend.generate([r]) for r in batch], repeats=2)
    print("| 8 requests, 8 adapters, 32 tokens | seconds | requests/s |\n|---|---|---|")
    print(f"| one at a time | {serial_s:.2f} | {8 / serial_s:.2f} |")
    print(f"| one mixed batch | {batched_s:.2f} | {8 / batched_s:.2f} |")
    print(f"| one batch, all one adapter | {same_s:.2f} | {8 / same_s:.2f} |")
    print(f"| speed-up | **{serial_s / batched_s:.2f}x** | |\n")

    # 3. loopback load test -----------------------------------------------------------------------
    import uvicorn

    scheduler = BatchScheduler(backend, router, max_batch=max(args.concurrency, *args.sweep))
    index = zoo.load_index().filtered(lambda e: e.model_id in backend.model_ids())
    app = create_app(scheduler, max_tokens_limit=64, registry=AdapterRegistry(index, scheduler))
    extras = [m for m in zoo.spec.members() if m.kind != "domain"][:2]  # not served until registered
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def make(i: int) -> tuple[str, dict | str]:
        domain = zoo.spec.domains[i % len(zoo.spec.domains)]
        text = query_text(tests[domain][2 + i // len(zoo.spec.domains)])
        if i % 10 == 9:  # malformed: bad JSON, unknown model, too many tokens, empty messages
            return "bad", ["{oops", {"model": "nope", "prompt": text}, {"prompt": text, "max_tokens": 999},
                           {"messages": []}][i // 10 % 4]  # fmt: skip
        model = "auto" if i % 2 else f"{domain}-{i % 3}" if i % 8 else "churn"
        if i % 3:
            return "ok", {"model": model, "prompt": text, "max_tokens": args.max_tokens}
        return "ok", {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": args.max_tokens,
        }

    def send(client: httpx.Client, kind: str, body) -> tuple[str, int, float]:
        path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
        clock = time.perf_counter()
        if isinstance(body, str):
            response = client.post(path, content=body, headers={"content-type": "application/json"})
        else:
            response = client.post(path, json=body)
        return kind, response.status_code, time.perf_counter() - clock

    done = threading.Event()

    def churn(client: httpx.Client) -> list[int]:
        """Register and remove ``churn`` (two adapters in turn) until the traffic is over."""
        codes = []
        while not done.is_set():
            member = extras[len(codes) // 2 % len(extras)]
            body = {"path": str(zoo.adapter_dir(member)), "id": "churn"}
            codes.append(client.post("/v1/adapters", json=body).status_code)
            time.sleep(0.5)
            codes.append(client.delete("/v1/adapters/churn").status_code)
        return codes

    jobs = [make(i) for i in range(args.requests)]
    clock = time.perf_counter()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        with concurrent.futures.ThreadPoolExecutor(args.concurrency + 1) as pool:
            churned = pool.submit(churn, client) if extras else None
            results = list(pool.map(lambda job: send(client, *job), jobs))
            done.set()
            churn_codes = churned.result() if churned else []
        health = client.get("/health").json()
    wall = time.perf_counter() - clock
    server.should_exit = True
    thread.join()

    ok = sorted(s for k, code, s in results if k == "ok" and code == 200)
    pinned_churn = [code for (_, body), (_, code, _) in zip(jobs, results, strict=True)
                    if isinstance(body, dict) and body.get("model") == "churn"]  # fmt: skip
    bad = [code for k, code, _ in results if k == "bad"]
    server_errors = sum(code >= 500 for _, code, _ in results)
    print(f"| load test: {args.requests} requests, {args.concurrency} concurrent | value |\n|---|---|")
    print(f"| server errors (5xx) | **{server_errors}** |")
    print(f"| well-formed answered 200 | {len(ok)}/{sum(k == 'ok' for k, _, _ in results)} |")
    print(f"| of which pinned to the churning adapter: 200 / 404 | {pinned_churn.count(200)} / "
          f"{pinned_churn.count(404)} |")  # fmt: skip
    print(f"| registrations 201 / removals 200 during traffic | {churn_codes[::2].count(201)}/"
          f"{len(churn_codes[::2])} / {churn_codes[1::2].count(200)}/{len(churn_codes[1::2])} |")  # fmt: skip
    print(f"| malformed answered 4xx | {sum(400 <= c < 500 for c in bad)}/{len(bad)} |")
    print(f"| latency p50 / p95 (s) | {statistics.median(ok):.2f} / {ok[int(0.95 * (len(ok) - 1))]:.2f} |")
    print(f"| throughput (requests/s) | {args.requests / wall:.2f} |")
    mean_rows = health["rows"] / max(health["batches"], 1)
    print(f"| forwards run / mean rows per forward | {health['batches']} / {mean_rows:.1f} |")

    # 4. latency and throughput by concurrency (well-formed requests pinned to the zoo's adapters) ---
    print(f"\n| concurrent requests ({args.sweep_requests} each, {args.max_tokens} tokens) | p50 s | p95 s | "
          "requests/s | tokens/s |\n|---|---|---|---|---|")  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
        for concurrency in args.sweep:
            bodies = [{"model": members[i % len(members)].id, "max_tokens": args.max_tokens,
                       "prompt": query_text(tests[members[i % len(members)].label][5 + i // len(members)])}
                      for i in range(args.sweep_requests)]  # fmt: skip

            def post(body: dict) -> tuple[float, int]:
                start = time.perf_counter()
                reply = client.post("/v1/completions", json=body).json()
                return time.perf_counter() - start, reply["usage"]["completion_tokens"]

            clock = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
                answered = list(pool.map(post, bodies))
            wall = time.perf_counter() - clock
            lat = sorted(t for t, _ in answered)
            p95 = lat[int(0.95 * (len(lat) - 1))]
            tokens = sum(n for _, n in answered)
            print(f"| {concurrency} | {statistics.median(lat):.2f} | {p95:.2f} | {len(lat) / wall:.2f} | "
                  f"{tokens / wall:.1f} |")  # fmt: skip
    server.should_exit = True
    thread.join()


if __name__ == "__main__":
    main()
