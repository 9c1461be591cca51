"""Embedding throughput on SmolLM2: PEFT reference procedure vs delta-router's batched path.

For N random r=8 adapters (q,k,v,o,gate,up,down) it reports adapters/second and peak RSS of
(a) the reference procedure (PeftModel.from_pretrained per adapter, one probe per forward,
unload) and (b) ``DeltaEmbedder(method="batched")``, each in its own process so peak RSS is
clean, plus the max |difference| of their embeddings and the compute floor: FLOPs per adapter
(2 x non-embedding params x probe tokens) over this machine's measured fp32 matmul FLOP/s.
A sweep of ``adapters_per_batch`` at the middle N justifies the default.

    python benchmarks/embed_throughput.py                 # N = 8, 32, 128
    python benchmarks/embed_throughput.py --sizes 8 --sweep 1 4   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from delta_router import DeltaEmbedder, resolve_base
from delta_router.home import cache_dir
from delta_router.testing import RandomAdapterFactory


def make_adapters(base_path: Path, count: int) -> list[Path]:
    """``count`` random r=8 adapters, cached under $DELTA_ROUTER_HOME/bench/ (seeded)."""
    root = cache_dir("bench", "adapters-r8")
    paths = [root / f"adapter-{i:03d}" for i in range(count)]
    missing = [p for p in paths if not (p / "adapter_model.safetensors").exists()]
    if missing:
        factory = RandomAdapterFactory(base_path, r=8, alpha=16)
        for path in missing:
            factory.make(path, seed=int(path.name.split("-")[1]), scale=0.01)
    return paths


def matmul_flops(seconds: float = 3.0) -> float:
    """Peak fp32 matmul FLOP/s on this machine's torch threads.

    The best rate seen over ~``seconds`` of a 2048^3 matmul and of the model's own MLP shape
    (probe tokens x 576 x 1536): the host is shared, so single timings swing by +-20%.
    """
    shapes = [(torch.randn(2048, 2048), torch.randn(2048, 2048)),
              (torch.randn(190, 576), torch.randn(576, 1536))]  # fmt: skip
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for a, b in shapes:
            start = time.perf_counter()
            torch.mm(a, b)
            elapsed = time.perf_counter() - start
            best = max(best, 2 * a.shape[0] * a.shape[1] * b.shape[1] / elapsed)
    return best


def child(method: str, count: int, per_batch: int, out: Path) -> None:
    """Runs in a fresh process: time embedding ``count`` adapters, report peak RSS."""
    base = resolve_base("smollm2-135m")
    paths = make_adapters(base.path, count)
    embedder = DeltaEmbedder(base, method=method, adapters_per_batch=per_batch, cache=False, progress=False)
    embedder.base_activations()  # loads the model: one-time cost, not throughput
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    vectors = embedder.transform(paths)
    seconds = time.perf_counter() - start
    np.save(out.with_suffix(".npy"), vectors)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(json.dumps({"seconds": seconds, "rss_loaded_mb": rss_before, "peak_mb": peak}))


def run_child(method: str, count: int, per_batch: int, tmp: Path) -> tuple[dict, np.ndarray]:
    out = tmp / f"{method}-{count}-{per_batch}.json"
    cmd = [sys.executable, __file__, "--child", method, str(count), str(per_batch), str(out)]
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text()), np.load(out.with_suffix(".npy"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--sweep", type=int, nargs="*", default=[1, 2, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=2, help="sweep repetitions")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, count, per_batch, out = args.child
        child(method, int(count), int(per_batch), Path(out))
        return

    base = resolve_base("smollm2-135m")
    make_adapters(base.path, max(args.sizes))
    embedder = DeltaEmbedder(base, progress=False)
    params = sum(
        p.numel() for n, p in embedder.model.named_parameters() if "embed_tokens" not in n
    )  # the LM head is tied to the embeddings and is not run
    probe_tokens = int(embedder.probe_batch["attention_mask"].sum())
    flops_per_adapter = 2 * params * probe_tokens
    peak_flops = matmul_flops()
    floor_s = flops_per_adapter / peak_flops
    default_g = embedder.adapters_per_batch
    del embedder

    machine = platform.processor() or platform.machine()
    print(f"# embed_throughput  {date.today()}  {machine}  {os.cpu_count()} cores  "
          f"torch {torch.__version__}  {torch.get_num_threads()} threads")  # fmt: skip
    print(f"non-embedding params {params / 1e6:.1f}M, probe tokens {probe_tokens}, "
          f"{flops_per_adapter / 1e9:.1f} GFLOP/adapter; matmul {peak_flops / 1e9:.0f} GFLOP/s "
          f"-> compute floor {floor_s:.3f} s/adapter ({1 / floor_s:.2f} adapters/s)\n")  # fmt: skip
    print("| N | method | adapters/s | speed-up | vs floor | RSS loaded MB | peak RSS MB | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for count in args.sizes:
            ref, ref_vec = run_child("reference", count, 1, tmp)
            ours, our_vec = run_child("batched", count, default_g, tmp)
            diff = float(np.abs(ref_vec - our_vec).max())
            for name, res in (("reference", ref), (f"batched (G={default_g})", ours)):
                rate = count / res["seconds"]
                print(f"| {count} | {name} | {rate:.2f} | {ref['seconds'] / res['seconds']:.2f}x | "
                      f"{res['seconds'] / count / floor_s:.2f}x | {res['rss_loaded_mb']:.0f} | "
                      f"{res['peak_mb']:.0f} | {diff if name != 'reference' else 0:.1e} |")  # fmt: skip
        if args.sweep:
            mid = sorted(args.sizes)[len(args.sizes) // 2]
            rates: dict[int, list[float]] = {g: [] for g in args.sweep}
            peaks: dict[int, float] = {}
            for _ in range(args.rounds):  # interleaved rounds: host noise hits every G alike
                for g in args.sweep:
                    res, _ = run_child("batched", mid, g, tmp)
                    rates[g].append(mid / res["seconds"])
                    peaks[g] = res["peak_mb"]
            print(f"\nadapters_per_batch sweep at N={mid} (batched, {args.rounds} rounds):\n")
            print("| adapters per forward | best adapters/s | all rounds | best vs floor | peak RSS MB |")
            print("|---|---|---|---|---|")
            for g in args.sweep:
                runs = " ".join(f"{r:.2f}" for r in rates[g])
                print(f"| {g} | {max(rates[g]):.2f} | {runs} | "
                      f"{1 / max(rates[g]) / floor_s:.2f}x | {peaks[g]:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
