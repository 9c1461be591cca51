"""The ``wild`` zoo: finetunes that differ the way public finetunes do, each drawn from a seed.

Every member draws its own LoRA initialisation seed, rank r in {4, 8, 16, 32, 64} with alpha r or 2r,
plain LoRA / rsLoRA / DoRA, target modules (q,v / q,k,v,o / all linear / MLP only), steps, learning
rate (2e-4 to 2e-3), max length (128 to 256), prompt format (``PROMPT_FORMATS``) and one of its
domain's datasets (``DOMAIN_DATASETS``). Besides these single-domain LoRAs, per domain one *strong*
member trains long enough to be clearly better than the base on its own dataset's test split; a few
*full* finetunes train every weight of the last blocks; *generalists* train on a mix of all domains.
What each member drew is in its ``training.json`` and in the index tags (``TrainConfig.tags``).

Steps are where the time goes (2 cores: ~0.5 s per example at 128 tokens): most go to the strong
members; the others take 6 to 16 steps, like most public finetunes of a few hundred examples. A
strong member trains rank 16 on every linear layer at lr 1e-3; in the ``deep`` domains, where
``strong_steps`` over every block stay within 5 points of the base, it puts its LoRA in the last
``deep_layers`` blocks only (the others run without gradients) and spends ``deep_steps`` steps on
records it has not seen (benchmarks/RESULTS.md, "Strong members").
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from delta_router.data.sources import DOMAIN_DATASETS
from delta_router.data.templates import PROMPT_FORMATS
from delta_router.training.trainer import LORA_TARGETS, TrainConfig
from delta_router.zoo.spec import ZooMember, ZooSpec

TARGET_SETS: dict[str, tuple[str, ...]] = {
    "qv": ("q_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all": LORA_TARGETS,
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
RANKS = (4, 8, 16, 32, 64)
LORA_KINDS = ("lora", "lora", "rslora", "dora")
LEARNING_RATES = (2e-4, 5e-4, 1e-3, 2e-3)
MAX_LENGTHS = (128, 192, 256)


@dataclass(frozen=True)
class WildSpec(ZooSpec):
    """``per_domain`` LoRAs per domain (the first strong, then alternating datasets), ``full`` full
    finetunes (domains in turn) and ``generalists``; ``steps`` are the ordinary members' choices.
    ``strong_datasets`` names a domain's strong member's dataset where it is not the first."""

    per_domain: int = 5
    full: int = 3
    generalists: int = 3
    steps: tuple[int, ...] = (6, 8, 12, 16)
    strong_steps: int = 32
    general_steps: int = 16
    full_steps: int = 16
    deep: tuple[str, ...] = ()
    deep_layers: int = 10
    deep_steps: int = 96
    strong_datasets: dict[str, str] = field(default_factory=dict)

    def members(self) -> list[ZooMember]:
        members = []
        for d in self.domains:
            datasets = list(self.datasets.get(d, {d: d}))
            for j in range(self.per_domain):
                dataset = datasets[j % len(datasets)]
                rng = self._rng(f"{d}-{j}")
                options = _lora_options(rng, self.strong_steps if j == 0 else rng.choice(self.steps))
                if j == 0:  # strong: a recipe that learns the domain, whatever format it is given in
                    options.update(rank=16, alpha=32, targets=LORA_TARGETS, learning_rate=1e-3)
                    if d in self.deep:
                        options.update(lora_layers=self.deep_layers, max_steps=self.deep_steps)
                    dataset = self.strong_datasets.get(d, dataset)
                variant = "strong" if j == 0 else "drawn"
                members.append(
                    ZooMember(f"{d}-{j}", (d,), j % 3, "domain", variant, _frozen(options), dataset)
                )
        for j in range(self.full):
            d = self.domains[j % len(self.domains)]
            rng = self._rng(f"full-{j}")
            options = {"method": "full", "unfreeze_last": 2, "learning_rate": 2e-4,
                       "seed": rng.randrange(10_000), "max_steps": self.full_steps,
                       "prompt_format": rng.choice(PROMPT_FORMATS)}  # fmt: skip
            dataset = next(iter(self.datasets.get(d, {d: d})))
            members.append(
                ZooMember(f"{d}-full-{j}", (d,), j % 3, "domain", "full", _frozen(options), dataset)
            )
        for j in range(self.generalists):
            options = _lora_options(self._rng(f"generalist-{j}"), self.general_steps)
            members.append(
                ZooMember(f"generalist-{j}", self.domains, j % 3, "generalist", "drawn", _frozen(options))
            )
        return members

    def records_for(self, member: ZooMember) -> int:
        """``train_size``; a deep strong member reads one batch of fresh records per step."""
        if dict(member.options).get("lora_layers"):
            return max(self.train_size, self.deep_steps * self.train.batch_size)
        return self.train_size

    def train_config(self, member: ZooMember) -> TrainConfig:
        """The member's drawn recipe (absolute values, unlike ``ZooSpec``'s robustness factors)."""
        return self.train.with_options(**dict(member.options))

    def _rng(self, key: str) -> random.Random:
        return random.Random(f"{self.name}-{self.seed}-{key}")


def _lora_options(rng: random.Random, steps: int) -> dict:
    rank = rng.choice(RANKS)
    kind = rng.choice(LORA_KINDS)
    return {
        "rank": rank,
        "alpha": rank * rng.choice((1, 2)),
        "use_rslora": kind == "rslora",
        "use_dora": kind == "dora",
        "targets": TARGET_SETS[rng.choice(sorted(TARGET_SETS))],
        "learning_rate": rng.choice(LEARNING_RATES),
        "max_length": rng.choice(MAX_LENGTHS),
        "prompt_format": rng.choice(PROMPT_FORMATS),
        "seed": rng.randrange(10_000),
        "max_steps": steps,
    }


def _frozen(options: dict) -> tuple[tuple[str, object], ...]:
    return tuple(sorted(options.items()))


# 7 domains x 5 LoRAs + 3 full finetunes + 3 generalists = 41 members; batches of 8 examples. The
# deep strong members are the multiple-choice domains' that 32 steps left within 5 points of the
# base; commonsense's learns CSQA (32 steps gained nothing on HellaSwag).
WILD_SPEC = WildSpec(
    "wild",
    tuple(DOMAIN_DATASETS),
    train_size=256,
    train=TrainConfig(batch_size=8, micro_batch_size=8, warmup_steps=2),
    datasets=DOMAIN_DATASETS,
    deep=("biomedical", "commonsense", "legal", "science"),
    strong_datasets={"commonsense": "csqa"},
)
# A small draw of the same kind, for a quick look: 3 domains x 2 LoRAs + 1 full + 1 generalist.
WILD_TINY_SPEC = WildSpec(
    "wild-small",
    ("sentiment", "biomedical", "math"),
    train_size=64,
    train=TrainConfig(batch_size=8, micro_batch_size=8, warmup_steps=2),
    datasets=DOMAIN_DATASETS,
    per_domain=2,
    full=1,
    generalists=1,
    steps=(4, 6),
    strong_steps=8,
    general_steps=6,
    full_steps=4,
)
