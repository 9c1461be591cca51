"""``select``, ``build`` and ``lorahub``: rank the index's finetunes for a task's examples, merge them."""

from __future__ import annotations

import argparse

from rich import box
from rich.table import Table

from delta_router.cli.common import POSITIVE, console, emit, index_inputs, load_router, selection_table
from delta_router.home import refuse_existing
from delta_router.search.index import ModelIndex


def task_selector(args: argparse.Namespace):
    """The ``TaskSelector`` that ``select`` and ``lorahub`` rank with."""
    from delta_router.search.selector import TaskSelector

    return TaskSelector(
        ModelIndex.load(args.index), method=args.method, progress=not args.json,
        prompt_format=args.prompt_format, router=load_router(args),
    )  # fmt: skip


def cmd_select(args: argparse.Namespace) -> None:
    selector = task_selector(args)
    selection = selector.select(args.examples, k=args.k)
    title = f"closest finetunes to {args.examples} ({selection.method}, {selection.num_examples} examples)"
    emit(args, selection.to_dict(), selection_table(selection, title))


def cmd_build(args: argparse.Namespace) -> None:
    from delta_router.merging.build import build_merged_model

    index = ModelIndex.load(args.index)
    inputs = (*index_inputs(index, args.index), args.examples, args.eval)
    refuse_existing(args.out, args.force, inputs=inputs)  # every check before any compute
    result = build_merged_model(
        args.examples, index, args.out, k=args.k, recipe=args.recipe,
        method=args.method, weighting=args.weighting, eval_examples=args.eval, seed=args.seed,
        output=args.output, rank=args.rank, force=args.force, progress=not args.json,
        verify=args.verify, confidence=args.confidence, folds=args.folds, prior=args.prior,
        router=load_router(args),
    )  # fmt: skip
    if args.json:
        emit(args, result.to_dict())
        return
    console.print(selection_table(result.selection, f"selected for {args.examples}"))
    if result.verdict is not None:
        console.print(verification_table(result.verdict))
        console.print(result.verdict.reason)
    console.print(f"wrote {result.chosen} ({args.output}) to {result.out_dir}")
    if result.scores:
        table = Table(title=f"held-out scores on {args.eval}")
        for col in ("model", "n", "acc", "nll / token"):
            table.add_column(col)
        for name, score in result.scores.items():
            acc = "-" if score.acc is None else f"{score.acc:.3f}"
            table.add_row(name, str(score.n), acc, f"{score.nll:.4f}")
        console.print(table)
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))


def verification_table(verdict) -> Table:
    """One row per candidate: accuracy and gain over the base on the examples, with intervals.

    The number columns never wrap, so the table reads on an 80-column terminal (names wrap instead).
    """
    table = Table(
        title=f"candidates on the examples (returned: {verdict.chosen})",
        caption="gain: over the base; bound: its corrected lower bound; CV: cross-validated",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    table.add_column("candidate", overflow="fold")
    for col in ("acc [95%]", "utility", "gain [95%]", "bound"):
        table.add_column(col, no_wrap=True, justify="right")
    for r in verdict.results:
        acc = r.accuracy
        acc_text = "-" if acc is None else f"{acc.mean:.2f} [{acc.low:.2f}, {acc.high:.2f}]"
        gain, bound = "-", "-"
        if r.gain is not None:
            g = r.gain.interval
            gain, bound = f"{g.mean:+.3f} [{g.low:+.2f}, {g.high:+.2f}]", f"{r.gain.bound:+.3f}"
        name = r.name + (" (CV)" if r.cross_validated else "")
        name = f"[bold]{name}[/bold]" if r.name == verdict.chosen else name
        table.add_row(name, acc_text, f"{r.scores.utility.mean():.3f}", gain, bound)
    return table


def cmd_lorahub(args: argparse.Namespace) -> None:
    from delta_router.merging.lorahub import LoraHub
    from delta_router.search.selector import read_examples

    selector = task_selector(args)
    inputs = (*index_inputs(selector.index, args.index), args.examples)
    refuse_existing(args.out, args.force, inputs=inputs)  # before minutes of compute, not after
    selection = selector.select(args.examples, k=args.k)
    adapters = [h.entry.embedding.path for h in selection.hits]
    hub = LoraHub(selector.embedder.base, adapters, budget=args.budget, progress=not args.json)
    hub.fit(read_examples(args.examples)[: args.fit_examples]).save(args.out, force=args.force)
    weights = dict(zip(selection.model_ids, map(float, hub.weights_), strict=True))
    payload = {
        "out_dir": str(args.out),
        "selection": selection.to_dict(),
        "weights": weights,
        "loss": hub.loss_,
    }
    table = Table(title=f"LoraHub weights, learnt on {args.fit_examples} examples (loss {hub.loss_:.4f})")
    for col in ("rank", "model id", "cosine", "weight"):
        table.add_column(col)
    for hit in selection.hits:
        table.add_row(str(hit.rank), hit.model_id, f"{hit.score:.4f}", f"{weights[hit.model_id]:+.3f}")
    emit(args, payload, table)
    if not args.json:
        console.print(f"LoRA adapter written to {args.out}")


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    """``select``, ``lorahub`` and ``build``: each ranks the index's finetunes for a task's examples."""
    from delta_router.data.templates import PROMPT_FORMATS
    from delta_router.merging.merger import WEIGHTINGS, available_recipes
    from delta_router.search.selector import SELECTION_METHODS

    commands = {}
    for name, func, text in (("select", cmd_select, "rank indexed finetunes for examples of a task"),
                             ("lorahub", cmd_lorahub, "select the top-k adapters, learn LoraHub weights"),
                             ("build", cmd_build, "select, merge, verify: a model for a task")):  # fmt: skip
        p = commands[name] = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--examples", required=True, help="JSONL/CSV of the task's examples (>= 5, ~20)")
        p.add_argument("--index", required=True, help="index directory")
        p.add_argument("-k", "--k", type=POSITIVE, default=3, help="number of finetunes (default 3)")
        p.add_argument(
            "--method",
            choices=SELECTION_METHODS,
            default="finetune",
            help="how the task is embedded: finetune = the paper's few-shot LoRA (default); "
            "activations = the base's activations on the examples, no training; "
            "queries = what the examples ask, not how they answer (needs --router)",
        )
        p.add_argument("--router", metavar="DIR", help="router of the index's models (route fit; "
                       "--data-free needs no data) whose profiles --method queries ranks by")  # fmt: skip
        p.set_defaults(func=func)

    for name in ("select", "lorahub"):
        commands[name].add_argument("--prompt-format", choices=PROMPT_FORMATS, default="alpaca",
                                    help="template the task LoRA is trained in (default alpaca)")  # fmt: skip
    hub = commands["lorahub"]
    hub.add_argument("--out", required=True, help="LoRA adapter directory to write")
    hub.add_argument("--budget", type=POSITIVE, default=40, help="loss evaluations of the search (40)")
    hub.add_argument(
        "--fit-examples", type=POSITIVE, default=5, help="examples the weights are learnt on (5)"
    )
    hub.add_argument("--force", action="store_true", help="replace a non-empty --out")

    build = commands["build"]
    build.add_argument("--out", required=True, help="output model directory")
    build.add_argument("--recipe", default="linear",
                       help=f"merge recipe: {', '.join(available_recipes())} or a YAML path")  # fmt: skip
    build.add_argument("--weighting", choices=WEIGHTINGS, default="uniform", help="merge weights")
    build.add_argument("--output", choices=("model", "adapter"), default="model",
                       help="model: a full model via mergekit (default); adapter: one LoRA")  # fmt: skip
    build.add_argument("--rank", type=POSITIVE, help="rank of a ties / dare_ties merged adapter "
                       "(--output adapter; default: the sum of the adapters' ranks)")  # fmt: skip
    build.add_argument(
        "--eval", metavar="FILE", help="held-out examples: score merged vs best single vs random"
    )
    build.add_argument("--seed", type=int, default=0, help="merge / folds / random-baseline seed")
    build.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="merge the top-k with --recipe without scoring candidates against the base",
    )
    build.add_argument(
        "--prior",
        choices=("selection", "base"),
        default="selection",
        help="returned unless the examples say otherwise: selection = the top-k linear merge "
        "(default), base = the base model",
    )
    build.add_argument(
        "--confidence",
        type=float,
        default=0.95,
        help="another candidate replaces the prior only if it beats the base at this confidence (0.95)",
    )
    build.add_argument(
        "--folds",
        type=int,
        default=2,
        help="cross-validation folds for candidates trained on the examples (2)",
    )
    build.add_argument("--force", action="store_true", help="replace a non-empty --out")
