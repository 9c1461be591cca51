"""Embedding a manifest of many finetunes: in process vs on Ray Data, into an index.

N random r=8 SmolLM2 adapters (``embed_throughput.make_adapters``) and a few broken items (a
truncated weights file, an unreadable adapter config, a missing directory) are written to a
manifest and embedded with ``embed_manifest`` into a new index, once in this process (torch on every core) and
once on a local Ray instance (``ray_runner``: ``--workers`` actors of ``--cpus`` CPUs, one torch
thread each), each on an empty embedding cache. Reported: time to the first committed chunk, total
wall time, adapters/s, the ratio to in-process, the items that failed (both runs must fail
exactly the broken ones and embed the rest), and the max |difference| of the two runs' vectors.
On one 2-core machine Ray cannot be faster (the same cores do the same FLOPs); the point is its
overhead, and that the vectors are the same, before spreading a job over a cluster's GPUs.

    python benchmarks/embed_scale.py                # N = 256, 2 workers
    python benchmarks/embed_scale.py --count 32     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from embed_throughput import make_adapters

from delta_router import DeltaEmbedder, ModelIndex, resolve_base
from delta_router.embedding.manifest import embed_manifest, read_manifest
from delta_router.home import cache_dir


def fresh_home(tmp: Path, name: str) -> Path:
    """A cache home with no embeddings that shares the real home's base models and adapters."""
    home = tmp / name
    home.mkdir()
    for part in ("bases", "downloads", "bench"):
        source = cache_dir(part)
        (home / part).symlink_to(source.resolve(), target_is_directory=True)
    return home


class FirstCommitTimed(ModelIndex):
    """A ModelIndex that notes when it is first saved: the manifest job commits each finished chunk."""

    first_commit: float | None = None

    def save(self, directory):
        if self.first_commit is None:
            self.first_commit = time.perf_counter()
        return super().save(directory)


def run(manifest: Path, index_dir: Path, home: Path, ray_options: dict | None) -> dict:
    """Embed the manifest into a new index under ``home``; timings and the vectors."""
    os.environ["DELTA_ROUTER_HOME"] = str(home)
    embedder = DeltaEmbedder(resolve_base("smollm2-135m"), progress=False)
    runner = None
    if ray_options is not None:
        from delta_router.embedding.ray_jobs import ray_runner

        runner = ray_runner(embedder.space, **ray_options)
    index = FirstCommitTimed(embedder.space)
    index.save(index_dir)
    index.first_commit = None
    start = time.perf_counter()
    items = read_manifest(manifest)
    result = embed_manifest(embedder, items, index, index_dir, progress=False, runner=runner)
    total = time.perf_counter() - start
    loaded = ModelIndex.load(index_dir)
    vectors = np.stack([loaded.get(m).embedding.vector for m in loaded.model_ids()])
    failed = sorted(item.path for item, _ in result.failures)
    return {"first_s": index.first_commit - start, "total_s": total, "vectors": vectors, "failed": failed}


def broken_items(tmp: Path, good: Path) -> list[Path]:
    """Three finetunes that cannot be embedded, made from the adapter ``good``."""
    truncated, bad_config = tmp / "broken-truncated", tmp / "broken-config"
    for path in (truncated, bad_config):
        shutil.copytree(good, path)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (bad_config / "adapter_config.json").write_text("{not json")
    return [truncated, bad_config, tmp / "broken-missing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=0.5, help="Ray CPUs per actor")
    args = parser.parse_args()

    base = resolve_base("smollm2-135m")
    paths = make_adapters(base.path, args.count)
    machine = platform.processor() or platform.machine()
    print(f"# embed_scale  {date.today()}  {machine}  {os.cpu_count()} cores  torch {torch.__version__}")
    print(f"{args.count} random r=8 adapters; Ray: {args.workers} actors x {args.cpus} CPU, 1 thread each\n")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        broken = broken_items(tmp, paths[0])
        items = paths[: len(paths) // 2] + broken + paths[len(paths) // 2 :]
        manifest = tmp / "manifest.jsonl"
        manifest.write_text("".join(json.dumps({"path": str(p), "id": p.name}) + "\n" for p in items))
        local = run(manifest, tmp / "local", fresh_home(tmp, "home-local"), None)
        ray_options = {"workers": args.workers, "cpus_per_worker": args.cpus}
        on_ray = run(manifest, tmp / "ray", fresh_home(tmp, "home-ray"), ray_options)
    diff = float(np.abs(local["vectors"] - on_ray["vectors"]).max())
    expected = sorted(str(p) for p in broken)
    print("| runner | first chunk s | total s | adapters/s | vs in process | failed | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for name, res in (("in process", local), (f"Ray, {args.workers} actors", on_ray)):
        rate = args.count / res["total_s"]
        failed = f"{len(res['failed'])} ({'the broken ones' if res['failed'] == expected else 'UNEXPECTED'})"
        shown = diff if res is on_ray else 0.0
        print(f"| {name} | {res['first_s']:.1f} | {res['total_s']:.1f} | {rate:.2f} | "
              f"{local['total_s'] / res['total_s']:.2f}x | {failed} | {shown:.1e} |")  # fmt: skip
    print(f"\nRay's overhead: {on_ray['total_s'] / local['total_s'] - 1:+.0%} of the in-process time")


if __name__ == "__main__":
    main()
