"""What a zoo holds: its members (``ZooMember``) and the recipe that lists them (``ZooSpec``).

A ``ZooSpec`` lists one finetune per domain and training third (``kind=domain``), finetunes on a
mixture of two domains (``kind=mixture``, for the additivity ablation) and finetunes with other
hyper-parameters (``kind=robustness``). ``delta_router.zoo.wild`` draws a zoo that varies the way
public finetunes vary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from delta_router.training.trainer import TrainConfig


@dataclass(frozen=True)
class ZooMember:
    """One finetune of the zoo: which data it sees and how it differs from the spec's recipe.

    ``dataset`` names one of the domain's datasets (``DOMAIN_DATASETS``; "" = the domain's own);
    ``options`` are ``TrainConfig`` overrides, read by the spec's ``train_config``.
    """

    id: str
    domains: tuple[str, ...]
    part: int
    kind: str = "domain"  # "domain" | "mixture" | "robustness" | "generalist"
    variant: str = "default"
    options: tuple[tuple[str, object], ...] = ()
    dataset: str = ""

    @property
    def label(self) -> str:
        """The domain tag (``a+b`` for a mixture, ``generalist`` for a mix of every domain)."""
        return "generalist" if self.kind == "generalist" else "+".join(self.domains)

    def tags(self) -> dict[str, str]:
        tags = {"domain": self.label, "kind": self.kind, "part": str(self.part), "variant": self.variant}
        return {**tags, "dataset": self.dataset} if self.dataset else tags


ROBUSTNESS_VARIANTS: dict[str, dict[str, float]] = {
    "r4": {"rank": 4, "alpha": 8},
    "r16": {"rank": 16, "alpha": 32},
    "lr-half": {"learning_rate": 0.5},
    "lr-double": {"learning_rate": 2.0},
    "half-data": {"num_examples": 0.5},
}


@dataclass(frozen=True)
class ZooSpec:
    """Which finetunes make a zoo and the recipe they share (``train_size`` records each).

    ``datasets`` maps a domain to its datasets (tag name -> data source name), for members that name
    a ``dataset``; a domain's own source is its name.
    """

    name: str
    domains: tuple[str, ...]
    parts: int = 3
    mixtures: tuple[tuple[str, str], ...] = ()
    robustness_domains: tuple[str, ...] = ()
    train_size: int = 256
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    datasets: dict[str, dict[str, str]] = field(default_factory=dict)

    def members(self) -> list[ZooMember]:
        members = [ZooMember(f"{d}-{p}", (d,), p) for d in self.domains for p in range(self.parts)]
        members += [ZooMember(f"mix-{a}+{b}", (a, b), 0, kind="mixture") for a, b in self.mixtures]
        members += [
            ZooMember(f"{d}-{name}", (d,), 1, "robustness", name, tuple(sorted(opts.items())))
            for d in self.robustness_domains
            for name, opts in ROBUSTNESS_VARIANTS.items()
        ]
        return members

    def train_config(self, member: ZooMember) -> TrainConfig:
        """The member's recipe: robustness options scale the learning rate and the data size."""
        options = dict(member.options)
        config = self.train
        if "learning_rate" in options:
            options["learning_rate"] = config.learning_rate * options["learning_rate"]
        if "num_examples" in options:
            options["num_examples"] = int(self.train_size * options["num_examples"])
        for key in ("rank", "alpha"):
            if key in options:
                options[key] = int(options[key])
        return config.with_options(**options)

    def records_for(self, member: ZooMember) -> int:
        """How many training records the member reads (``train_size``)."""
        return self.train_size

    def source(self, member: ZooMember, domain: str) -> str:
        """The data source a member reads for ``domain``: its dataset's, or the domain's own."""
        if not member.dataset:
            return domain
        return self.datasets.get(domain, {}).get(member.dataset, domain)
