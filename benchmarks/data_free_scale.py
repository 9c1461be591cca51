"""Data-free router fitting at hub scale: the default profile deltas against ``--profile-deltas index``.

``route fit --data-free`` predicts each indexed model's router profile from deltas. With the default
(``formats+plain``) those are taken by forward passes of 15 + 15 probes through every model
(``routing.data_free.profile_embedder``); with ``index`` they are the vectors the index already
holds. The baseline measured in this run: the forward pass on ``--adapters`` random r=8 SmolLM2
adapters with an empty embedding cache, seconds per model, times N. Then, for each N, a flat index
of N zoo-like 576-dim vectors (``index_scale.vectors``) is profiled with ``fit_data_free(...,
deltas="index")`` from 21 synthetic reference pairs, timed whole (reading the vectors, the map,
the router).

    python benchmarks/data_free_scale.py                 # N = 10k, 100k
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from embed_scale import fresh_home
from embed_throughput import make_adapters
from index_scale import DIM, template, vectors

from delta_router import ModelIndex, resolve_base
from delta_router.routing.data_free import DEFAULT_PROFILE_DELTAS, fit_data_free, profile_embedder
from delta_router.routing.router import Router


def forward_seconds_per_model(count: int) -> float:
    """Seconds per model of the default profile deltas: ``count`` adapters through each part's probes."""
    base = resolve_base("smollm2-135m")
    paths = make_adapters(base.path, count)
    with tempfile.TemporaryDirectory() as tmp:
        previous = os.environ.get("DELTA_ROUTER_HOME")
        os.environ["DELTA_ROUTER_HOME"] = str(fresh_home(Path(tmp), "home"))
        try:
            first, *others = DEFAULT_PROFILE_DELTAS.split("+")
            embedders = [profile_embedder(base, deltas=first)]
            embedders += [profile_embedder(base, live=embedders[0].live, deltas=kind) for kind in others]
            for embedder in embedders:
                embedder.transform(paths[:1])  # the base's own activations, once
            clock = time.perf_counter()
            for embedder in embedders:
                embedder.transform(paths[1:])
            return (time.perf_counter() - clock) / (count - 1)
        finally:
            if previous is None:
                os.environ.pop("DELTA_ROUTER_HOME")
            else:
                os.environ["DELTA_ROUTER_HOME"] = previous


def index_fit_seconds(n: int) -> float:
    """``fit_data_free(deltas="index")`` over a flat index of ``n`` synthetic models."""
    model = template()
    data = vectors(n, seed=0)
    index = ModelIndex(kind="flat")
    index.add_many([dataclasses.replace(model, vector=data[i], model_id=f"m-{i}") for i in range(n)])
    rng = np.random.default_rng(0)
    profiles = rng.standard_normal((21, DIM)).astype(np.float32)
    profiles /= np.linalg.norm(profiles, axis=1, keepdims=True)
    reference = Router([f"r-{i}" for i in range(21)], profiles, np.zeros(DIM, np.float32), model.space.base)
    clock = time.perf_counter()
    router = fit_data_free(index, vectors(21, seed=3), reference, deltas="index")
    seconds = time.perf_counter() - clock
    assert len(router.model_ids) == n
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--adapters", type=int, default=9, help="adapters timed for the forward pass")
    args = parser.parse_args()
    print(f"# data_free_scale  {date.today()}  {platform.machine()}  {torch.get_num_threads()} threads")
    per_model = forward_seconds_per_model(args.adapters)
    kind = DEFAULT_PROFILE_DELTAS
    print(f"{kind} deltas: {per_model:.2f} s per model (forward passes, {args.adapters - 1} adapters)\n")
    print(f"| N | {kind} deltas (N x forward) | index deltas | ratio |")
    print("|---|---|---|---|")
    for n in args.sizes:
        seconds, projected = index_fit_seconds(n), per_model * n
        row = f"| {n:,} | {projected / 3600:.1f} h | {seconds:.1f} s | {projected / seconds:,.0f}x |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
