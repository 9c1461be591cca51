"""Where the batched embedder's time goes, per adapter, against the compute floor.

One batched forward of ``DeltaEmbedder`` (G adapters x the 5 probes, SmolLM2, random r=8 LoRA on
q,k,v,o,gate,up,down) is taken apart by measurement, each part the best of ``--repeats`` runs:

- **floor**: FLOPs per adapter (2 x non-embedding params x real probe tokens) at the best fp32
  GEMM rate measured here (``embed_throughput.matmul_flops``);
- **GEMM shapes**: the body's linear layers alone (``F.linear`` at every layer's shape) on the real
  token count, minus the floor: what this CPU's GEMMs lose at these shapes (a few hundred rows)
  against its best large GEMM;
- **padding**: the same GEMMs on the padded batch, minus the real-token GEMMs;
- **rest of the body**: the forward without adapters, minus its GEMMs (attention, RMSNorm, rotary,
  SiLU, residual adds, embedding look-up, Python and dispatch);
- **LoRA**: the forward with the adapters' hooks, minus the forward without.

The parts add up to the measured forward. A ``torch.profiler`` table of the forward's most
expensive operators follows (self CPU time), and the hooked forward is run with one more G.

    python benchmarks/embed_profile.py                 # G = 4 (the CPU default)
    python benchmarks/embed_profile.py --groups 4 16
"""

from __future__ import annotations

import argparse
import os
import platform
import timeit
from datetime import date

import torch
import torch.nn.functional as F
from embed_throughput import make_adapters, matmul_flops

from delta_router import DeltaEmbedder, resolve_base
from delta_router.models.finetunes import Finetune, load_lora_factors
from delta_router.models.lora_batch import lora_hooks


def best_of(fn, repeats: int) -> float:
    """Fastest of ``repeats`` timed calls (s); one untimed warm-up call first."""
    fn()
    return min(timeit.repeat(fn, repeat=repeats, number=1))


def linear_shapes(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights of every linear layer of the transformer blocks (the LM head is not run)."""
    return [
        m.weight for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in name
    ]


def gemm_seconds(weights: list[torch.Tensor], rows: int, repeats: int) -> float:
    """Time of ``F.linear`` on ``[rows, in]`` inputs for every weight, one after another."""
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}

    def run() -> None:
        with torch.inference_mode():
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

    return best_of(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", type=int, nargs="+", default=[4], help="adapters per forward (G)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    base = resolve_base("smollm2-135m")
    embedder = DeltaEmbedder(base, cache=False, progress=False)
    model = embedder.model
    mask = embedder.probe_batch["attention_mask"]
    probes, padded_len = mask.shape
    real_tokens = int(mask.sum())
    params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    peak = matmul_flops()
    weights = linear_shapes(model)
    machine = platform.processor() or platform.machine()
    print(f"# embed_profile  {date.today()}  {machine}  {os.cpu_count()} cores  "
          f"torch {torch.__version__}  {torch.get_num_threads()} threads")  # fmt: skip
    print(
        f"{probes} probes, {real_tokens} real / {probes * padded_len} padded tokens; "
        f"{2 * params * real_tokens / 1e9:.1f} GFLOP/adapter; best GEMM {peak / 1e9:.0f} GFLOP/s\n"
    )

    paths = make_adapters(base.path, max(args.groups))
    factors = [load_lora_factors(Finetune.open(p), model, base) for p in paths]
    embedder.base_activations()
    for groups in args.groups:
        floor = 2 * params * real_tokens / peak
        gemm_real = gemm_seconds(weights, groups * real_tokens, args.repeats) / groups
        gemm_padded = gemm_seconds(weights, groups * probes * padded_len, args.repeats) / groups
        body = best_of(lambda g=groups: embedder._forward(groups=g), args.repeats) / groups

        def hooked(g: int = groups) -> None:
            with lora_hooks(model, factors[:g]):
                embedder._forward(groups=g)

        total = best_of(hooked, args.repeats) / groups
        parts = [
            ("compute floor (all GEMM FLOPs at the best GEMM rate)", floor),
            ("GEMM shapes (body GEMMs on real tokens - floor)", gemm_real - floor),
            ("padding (GEMMs on padded - real tokens)", gemm_padded - gemm_real),
            ("rest of the body (forward without LoRA - its GEMMs)", body - gemm_padded),
            ("LoRA hooks (forward with - without)", total - body),
        ]
        print(f"## G = {groups}: {total:.3f} s/adapter ({1 / total:.2f} adapters/s), "
              f"{total / floor:.2f}x the floor\n")  # fmt: skip
        print("| part | s/adapter | share |")
        print("|---|---|---|")
        for name, seconds in parts:
            print(f"| {name} | {seconds:.3f} | {seconds / total:.0%} |")
        rate = 2 * params * real_tokens / gemm_real
        print(f"\nbody GEMMs alone run at {rate / 1e9:.0f} GFLOP/s ({rate / peak:.0%} of the best GEMM)\n")

        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            hooked()
        table = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=40
        )
        print(f"torch.profiler, one hooked forward of G = {groups}:\n```\n{table}```\n")


if __name__ == "__main__":
    main()
