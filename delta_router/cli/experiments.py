"""``eval``, ``compare``, ``ablations`` and ``demo``: measurements on held-out data and zoos."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.table import Table

from delta_router.cli.common import (
    NON_NEGATIVE,
    POSITIVE,
    add_base_option,
    add_zoo_option,
    console,
    emit,
    load_router,
)
from delta_router.data.sources import UNSEEN_SUITES
from delta_router.data.templates import PROMPT_FORMATS
from delta_router.errors import DeltaRouterError
from delta_router.home import atomic_write_text, refuse_existing_file, report_dir
from delta_router.model_ids import BASE_MODEL_NAME
from delta_router.models.base import resolve_base
from delta_router.models.finetunes import Finetune, check_fits
from delta_router.search.selector import SELECTION_METHODS


def cmd_eval(args: argparse.Namespace) -> None:
    from delta_router.data import load_domain, load_records
    from delta_router.evaluation.harness import LmEvaluator, load_for_eval, task_name, write_tasks

    if args.out:
        refuse_existing_file(args.out, args.force)
    held_out = {d: load_domain(d).test[: args.size] for d in args.domains or []}
    if args.examples:
        held_out["user"] = load_records(args.examples)
    if not held_out:
        raise DeltaRouterError("nothing to evaluate on: give DOMAIN names with --domain, or --examples FILE")
    evaluator = LmEvaluator(write_tasks(held_out), batch_size=args.batch_size, limit=args.limit)
    tasks = [t for t in evaluator.tasks if args.generate or not t.endswith("_gen")]
    base = resolve_base(args.base)
    for model in args.models:  # every model checked before the first evaluation
        if model != BASE_MODEL_NAME:
            check_fits(Finetune.open(model), base)
    results = {}
    for model in args.models:
        loaded, tokenizer = load_for_eval(model, base)
        results[model] = evaluator.evaluate(loaded, tokenizer, tasks)
        del loaded
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(results, indent=2))  # checked before the evals
    table = Table(title=f"lm-eval on held-out splits (limit {args.limit or 'none'})")
    table.add_column("model")
    columns = [(t, m) for t in tasks for m in results[args.models[0]][t]]
    for task, metric in columns:
        table.add_column(f"{task.removeprefix(task_name(''))} {metric}")
    for model, per_task in results.items():
        table.add_row(Path(model).name, *(f"{per_task[t][m]:.3f}" for t, m in columns))
    emit(args, results, table)


def cmd_compare(args: argparse.Namespace) -> None:
    if args.suite:
        return cmd_unseen_suite(args)
    with report_dir(args.out or "reports/compare", args.force) as out:
        _compare(args, out)


def _compare(args: argparse.Namespace, out: Path) -> None:
    from delta_router.experiments.compare import (
        CompareConfig,
        SelectionComparison,
        gain_table,
        summarize,
        write_report,
    )
    from delta_router.search.selector import read_examples
    from delta_router.zoo.zoo import Zoo

    router = load_router(args)
    zoo = Zoo(args.zoo, args.base, progress=False)
    config = CompareConfig(
        ks=tuple(args.k or (1, 3, 5)), recipes=tuple(args.recipe or ("linear", "ties")), seeds=args.seeds,
        examples=args.examples, eval_size=args.eval_size or 300, limit=args.limit, method=args.method,
        hub_size=args.lorahub, hub_budget=args.lorahub_budget,
    )  # fmt: skip
    tasks = [
        (name, read_examples(examples), read_examples(held_out))
        for name, examples, held_out in args.task or []
    ]
    comparison = SelectionComparison(zoo, config, progress=not args.json, router=router)
    rows = comparison.run(args.domains or ([] if tasks else zoo.spec.domains))
    for task in tasks:
        rows += comparison.run_task(*task)
    write_report(rows, out, "delta-router " + " ".join(sys.argv[1:]))
    if args.json:
        emit(args, summarize(rows))
        return
    console.print(gain_table(summarize(rows)))
    console.print(f"written to {out} (compare.md with every condition, compare.json, gains.png, compare.png)")


def cmd_unseen_suite(args: argparse.Namespace) -> None:
    """``compare --suite unseen|unseen-dev``: build on tasks outside the zoo's datasets
    (``experiments.unseen``)."""
    suite = UNSEEN_SUITES[args.suite]
    unknown = sorted(set(args.domains or []) - set(suite))
    if unknown:
        raise DeltaRouterError(f"unknown {args.suite} tasks {unknown}; the suite has {', '.join(suite)}")
    if args.method != "finetune" or args.router:
        raise DeltaRouterError(f"--suite {args.suite} selects as build does by default (the task LoRA): "
                               "--method and --router are not used there")  # fmt: skip
    with report_dir(args.out or f"reports/{args.suite}", args.force) as out:
        _unseen_suite(args, suite, out)


def _unseen_suite(args: argparse.Namespace, suite_tasks: tuple[str, ...], out: Path) -> None:
    from delta_router.experiments.unseen import SuiteConfig, UnseenSuite, write_report
    from delta_router.zoo.zoo import Zoo

    config = SuiteConfig(
        k=(args.k or [3])[0], examples=args.examples, held_out=args.eval_size or 200, seeds=args.seeds
    )
    suite = UnseenSuite(Zoo(args.zoo, args.base, progress=False).load_index(), config, progress=not args.json)
    command = "delta-router " + " ".join(sys.argv[1:])
    tasks = args.domains or suite_tasks
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else []
    results = [r for r in previous if r["task"] not in tasks]  # tasks run before stay in the report
    for task in tasks:  # the report is rewritten after each task
        results.append(suite.run_task(task))
        results.sort(key=lambda r: (suite_tasks + (r["task"],)).index(r["task"]))
        write_report(results, out, command)
    table = Table(title=f"unseen tasks: accuracy (%) on {config.held_out} held-out records -> {out}")
    columns = ("base", "returned (selection prior)", "random merge", "oracle single")
    for col in ("task", "returned model", *columns):
        table.add_column(col)
    for r in results:
        acc = {name: f"{100 * a['mean']:.1f}" for name, a in r["accuracy"].items()}
        table.add_row(r["task"], r["returned"]["selection"], *(acc[c] for c in columns))
    emit(args, results, table)


def cmd_ablations(args: argparse.Namespace) -> None:
    from delta_router.experiments.ablations import ABLATIONS

    unknown = sorted(set(args.only or []) - set(ABLATIONS))
    if unknown:
        raise DeltaRouterError(f"unknown ablations {unknown}; known: {', '.join(ABLATIONS)}")
    if args.reference and not Path(args.reference).is_dir():
        raise DeltaRouterError(f"--reference {args.reference}: not a directory (an ablations --out)")
    with report_dir(args.out, args.force):
        _ablations(args)


def _ablations(args: argparse.Namespace) -> None:
    from delta_router.experiments.ablations import Ablations
    from delta_router.zoo.zoo import Zoo

    zoo = Zoo(args.zoo, args.base, progress=False)
    ablations = Ablations(zoo, args.out, tuple(args.fewshot_sizes), args.fewshot_queries,
                          args.fewshot_formats, args.fewshot_methods, args.probe_variants)  # fmt: skip
    results = ablations.run(args.only)
    if args.reference:
        from delta_router.experiments.summary import write_summary

        write_summary(args.out, args.reference, (args.zoo, args.reference_name))
    table = Table(title=f"ablations on zoo {args.zoo} -> {args.out}")
    for col in ("ablation", "seconds", "report"):
        table.add_column(col)
    for name, result in results.items():
        table.add_row(name, f"{result['seconds']:.0f}", str(Path(args.out) / f"{name}.md"))
    emit(args, results, table)


def cmd_demo(args: argparse.Namespace) -> None:
    from delta_router.experiments.demo import run_demo

    with console.status(f"resolving base {args.base} (a first fetch takes ~1 min)"):
        base = resolve_base(args.base)
    result = run_demo(base)
    report = result.report
    payload = {
        "base": result.base,
        "index": result.index_dir,
        "seconds": result.seconds,
        "silhouette": report.silhouette_domain,
        "top1_correct": result.top1_correct,
        "queries": {q: [(h.model_id, h.score) for h in hits] for q, hits in result.queries.items()},
        "learned": report.learned(),
        "build": result.build.to_dict(),
        "routes": {domain: decision.to_dict() for domain, decision in result.routes.items()},
    }
    table = Table(title=f"each finetune's nearest neighbours in the index ({result.base})")
    for col in ("finetune", "domain", "rank", "neighbour", "cosine", "its domain"):
        table.add_column(col)
    for query, hits in result.queries.items():
        for hit in hits:
            domain = hit.entry.tags["domain"]
            mark = "" if domain == result.domains[query] else " (other)"
            first = hit.rank == 1
            table.add_row(query if first else "", result.domains[query] if first else "", str(hit.rank),
                          hit.model_id, f"{hit.score:.3f}", domain + mark)  # fmt: skip
    emit(args, payload, table)
    if not args.json:
        learned = report.learned()
        times = ", ".join(f"{k} {v:.0f}s" for k, v in result.seconds.items())
        console.print(f"silhouette by domain {report.silhouette_domain:.3f}; nearest neighbour in the same "
                      f"domain {result.top1_correct}/{len(result.queries)}; beat the base on their domain's "
                      f"held-out records {sum(learned.values())}/{len(learned)}")  # fmt: skip
        picked = ", ".join(f"{h.model_id} ({h.score:.3f})" for h in result.build.selection.hits)
        console.print(f"20 examples -> selected {picked} -> merged (ties) into {result.build.out_dir}")
        routes = ", ".join(f"a {d} query -> {r.target} ({r.score:.2f})" for d, r in result.routes.items())
        console.print(f"router: {routes}")
        console.print(f"({times})")
        console.print(f"report: {report.out_dir}/report.md; index: {result.index_dir}")


def add_commands(sub, common: argparse.ArgumentParser) -> None:

    p = sub.add_parser("eval", parents=[common], help="score models with lm-eval on held-out splits")
    p.add_argument("models", nargs="+", metavar="MODEL", help="'base', a LoRA adapter dir or a model dir")
    p.add_argument("--domain", dest="domains", action="append", metavar="DOMAIN", help="built-in domain")
    p.add_argument("--examples", help="your own held-out JSONL/CSV (task 'user')")
    p.add_argument("--size", type=POSITIVE, default=300, help="test records per domain (default: all 300)")
    p.add_argument("--limit", type=POSITIVE, help="lm-eval document limit per task")
    p.add_argument("--generate", action="store_true", help="also run generative tasks (slow on CPU)")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="lm-eval batch size (16)")
    add_base_option(p)
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", parents=[common], help="Delta-Activations selection vs random merges")
    add_zoo_option(p, "full")
    add_base_option(p)
    p.add_argument("--domain", dest="domains", action="append", help="target domain (default: all)")
    p.add_argument("--task", nargs=3, action="append", metavar=("NAME", "EXAMPLES", "HELD_OUT"),
                   help="your task: ~20 examples and held-out records (JSONL/CSV); repeatable")  # fmt: skip
    p.add_argument("-k", "--k", type=POSITIVE, action="append", help="models per merge (default 1 3 5)")
    p.add_argument("--recipe", action="append", help="merge recipe (default linear, ties)")
    p.add_argument("--seeds", type=POSITIVE, default=5, help="random merges per setting (default 5)")
    p.add_argument("--examples", type=POSITIVE, default=20, help="few-shot examples per task (default 20)")
    p.add_argument("--eval-size", type=POSITIVE, help="held-out records per domain (300; suite: 200)")
    p.add_argument("--limit", type=POSITIVE, help="lm-eval document limit per task")
    p.add_argument("--method", choices=SELECTION_METHODS, default="finetune",
                   help="selection method (queries: by what the examples ask, needs --router)")  # fmt: skip
    p.add_argument("--router", metavar="DIR", help="router of the zoo's finetunes that --method queries "
                   "ranks by (route fit --zoo Z, or --index --data-free)")  # fmt: skip
    p.add_argument("--lorahub", type=NON_NEGATIVE, default=5, metavar="N",
                   help="LoraHub protocol: top-1 + N-1 random vs N random (0: skip; default 5)")  # fmt: skip
    p.add_argument("--lorahub-budget", type=POSITIVE, default=40, help="loss evaluations per LoraHub search")
    p.add_argument("--suite", choices=tuple(UNSEEN_SUITES),
                   help="build on tasks no zoo trains on (--domain picks tasks); unseen-dev: five "
                   "other such tasks, to choose settings on")  # fmt: skip
    p.add_argument("--out", help="report directory (default reports/compare; --suite S: reports/S)")
    p.add_argument(
        "--force", action="store_true", help="write the report's files into an --out that holds other files"
    )
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("ablations", parents=[common], help="rerun the paper's analyses on a zoo")
    add_zoo_option(p, "full")
    add_base_option(p)
    p.add_argument("--only", action="append", help="run only this ablation (repeatable)")
    p.add_argument("--fewshot-queries", type=POSITIVE, default=1, help="queries per domain and size")
    p.add_argument(
        "--fewshot-sizes", type=POSITIVE, nargs="+", default=[5, 10, 20, 50], help="examples per task"
    )
    p.add_argument("--fewshot-formats", nargs="+", choices=PROMPT_FORMATS, default=["alpaca"],
                   help="prompt formats of the few-shot queries' examples (default alpaca)")  # fmt: skip
    p.add_argument("--fewshot-methods", nargs="+", choices=SELECTION_METHODS, default=list(SELECTION_METHODS),
                   help="selection methods of the few-shot ablation (default all; queries: with the zoo's "
                   "profiles from training prompts and data-free ones)")  # fmt: skip
    p.add_argument("--out", default="reports", help="report directory (default reports)")
    p.add_argument(
        "--force", action="store_true", help="write the report's files into an --out that holds other files"
    )
    p.add_argument(
        "--reference",
        metavar="DIR",
        help="also write OUT/README.md: the headline figures next to DIR's (another zoo's reports)",
    )
    p.add_argument("--reference-name", default="full", help="the zoo DIR's reports are of (default full)")
    p.add_argument("--probe-variants", nargs="+", metavar="NAME",
                   help='only these variants of the probes ablation, e.g. "5 probes (paper)"')  # fmt: skip
    p.set_defaults(func=cmd_ablations)

    p = sub.add_parser("demo", parents=[common], help="the end-to-end job on the default base")
    add_base_option(p)
    p.set_defaults(func=cmd_demo)
