"""``base``, ``embed`` and ``index``: base models, embedding finetunes, managing an index."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from delta_router.cli.common import (
    POSITIVE,
    add_base_option,
    add_embedding_options,
    console,
    embedder_from_args,
    emit,
    parse_tags,
)
from delta_router.embedding.embedder import Embedding
from delta_router.errors import DeltaRouterError, DuplicateModelError
from delta_router.home import atomic_write_text, refuse_existing_file
from delta_router.model_ids import RULE, check_model_id
from delta_router.models.base import EMBEDDED_BASES, fetch_embedded_base, resolve_base
from delta_router.search.index import INDEX_KINDS, ModelIndex, is_index_temp


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
    held = [p for p in directory.iterdir() if not is_index_temp(p)] if directory.is_dir() else []
    if directory.is_file() or held:  # an interrupted first save leaves only its temp files
        raise DeltaRouterError(f"{directory} exists and is not a model index: give a new or empty directory")
    return ModelIndex(kind=args.kind or "auto")


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
    emit(args, info, table)


def cmd_embed(args: argparse.Namespace) -> int:
    if args.manifest:
        return cmd_embed_manifest(args)
    if not args.paths:
        raise DeltaRouterError("give finetune PATHs to embed, or --manifest FILE")
    if args.ray:
        raise DeltaRouterError("--ray embeds a manifest: give --manifest FILE")
    if args.index:
        cmd_index_add(args)
        return 0
    if args.out:
        refuse_existing_file(args.out, args.force)
    _check_ids(args)
    embeddings = embedder_from_args(args).embed(args.paths, args.id)
    if args.out:
        atomic_write_text(Path(args.out), json.dumps([e.to_dict() for e in embeddings]))
    emit(args, [e.to_dict(with_vector=args.out is None) for e in embeddings],
          _embedding_table(embeddings, "Delta Activations"))  # fmt: skip
    return 0


def cmd_embed_manifest(args: argparse.Namespace) -> int:
    """Every item of the manifest; exit status 1 when some failed (each is listed with its reason)."""
    from delta_router.embedding.manifest import embed_manifest, read_manifest

    if args.paths or args.id or args.out or args.tag:
        raise DeltaRouterError(
            "--manifest takes paths, ids and tags from the file: drop PATHs, --id, --tag and --out"
        )
    if args.failures:
        refuse_existing_file(args.failures, args.force, "--failures")
    items = read_manifest(args.manifest)
    index = _load_or_new_index(args) if args.index else None
    embedder = embedder_from_args(args, index)
    runner = None
    if args.ray:
        from delta_router.embedding.ray_jobs import ray_runner

        address = None if args.ray == "local" else args.ray
        runner = ray_runner(embedder.space, address, args.ray_workers, args.ray_cpus, args.ray_gpus)
    result = embed_manifest(embedder, items, index, args.index, progress=not args.json, runner=runner)
    if args.failures:
        lines = [json.dumps(row) + "\n" for row in result.to_dict()["failed"]]
        atomic_write_text(Path(args.failures), "".join(lines))
    table = Table(title=f"{len(items)} items: {len(result.embedded)} embedded, {len(result.skipped)} "
                  f"already indexed, {len(result.failures)} failed")  # fmt: skip
    for col in ("line", "path", "reason"):
        table.add_column(col, overflow="fold")
    for item, reason in result.failures:
        table.add_row(item.where, item.path, reason)
    emit(args, result.to_dict(), table)
    return 1 if result.failures else 0


def cmd_index_add(args: argparse.Namespace) -> None:
    index = _load_or_new_index(args)
    embedder = embedder_from_args(args, index)
    _check_ids(args)
    if not args.replace:  # refuse duplicates before spending any compute
        from delta_router.models.finetunes import Finetune

        ids = args.id or [Finetune.open(p).model_id for p in args.paths]
        for model_id in ids:
            if model_id in index:
                raise DuplicateModelError(
                    f"model {model_id!r} is already in {args.index} (use --replace to overwrite)"
                )
    embeddings = embedder.embed(args.paths, args.id)
    _check_unique_ids(embeddings)
    tags = parse_tags(args.tag)
    for embedding in embeddings:
        index.add(embedding, tags=tags, replace=args.replace)
    index.save(args.index)
    emit(args, {"index": str(args.index), "added": [e.model_id for e in embeddings],
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
    emit(args, {"removed": args.ids, "size": len(index)})
    if not args.json:
        console.print(f"removed {', '.join(args.ids)} ({len(index)} models left)")


def cmd_index_tag(args: argparse.Namespace) -> None:
    index = ModelIndex.load(args.index)
    entry = index.update(args.model_id, tags=parse_tags(args.tag))
    index.save(args.index)
    emit(args, {"model_id": args.model_id, "tags": entry.tags})
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
    emit(args, rows, table)


def cmd_index_search(args: argparse.Namespace) -> None:
    index = ModelIndex.load(args.index)
    if (args.query is None) == (args.id is None):
        raise DeltaRouterError("give either a finetune PATH to embed or --id of an indexed model")
    if args.id is not None:
        query, exclude = index.get(args.id).embedding, {args.id}
    else:
        query, exclude = embedder_from_args(args, index).embed_one(args.query), set()
    hits = index.search(query, k=args.k, exclude=exclude, where=parse_tags(args.where, "--where"))
    rows = [{"rank": h.rank, "model_id": h.model_id, "score": h.score, "tags": h.entry.tags}
            for h in hits]  # fmt: skip
    table = Table(title=f"nearest to {args.id or args.query}")
    for col in ("rank", "model id", "cosine", "tags"):
        table.add_column(col)
    for row in rows:
        tags = ", ".join(f"{k}={v}" for k, v in row["tags"].items())
        table.add_row(str(row["rank"]), row["model_id"], f"{row['score']:.4f}", tags)
    emit(args, rows, table)


def cmd_index_migrate(args: argparse.Namespace) -> None:
    index = ModelIndex.migrate(args.index)
    emit(args, {"index": str(args.index), "models": len(index)})
    if not args.json:
        console.print(f"migrated {args.index} ({len(index)} models)")


def cmd_index_info(args: argparse.Namespace) -> None:
    index = ModelIndex.load(args.index)
    info = {
        "index": str(args.index),
        "models": len(index),
        "kind": index.kind,
        "structure": index.structure,
        "space": index.space.describe() if index.space else None,
        "tags": sorted({k for e in index.list() for k in e.tags}),
    }
    table = Table(title=f"index {args.index}", show_header=False)
    for key, value in info.items():
        table.add_row(key, str(value))
    emit(args, info, table)


def _add_index_write_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--id", action="append", help=f"model id for each PATH (default: dir name); ids are {RULE}"
    )
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="tag (repeatable)")
    p.add_argument("--replace", action="store_true", help="overwrite models already indexed")
    p.add_argument(
        "--kind",
        choices=INDEX_KINDS,
        help="FAISS kind of a new index (default auto: exact, HNSW from 10,000 models)",
    )


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    base = sub.add_parser("base", help="fetch or inspect base models").add_subparsers(
        dest="action", required=True
    )
    for name, func, text in (("fetch", cmd_base_fetch, "fetch (and dequantise) a base once"),
                             ("info", cmd_base_info, "show a base's fingerprint")):  # fmt: skip
        p = base.add_parser(name, parents=[common], help=text)
        add_base_option(p)
        if name == "fetch":
            p.add_argument("--force", action="store_true", help="re-create the cached copy")
        p.set_defaults(func=func)

    p = sub.add_parser("embed", parents=[common], help="embed finetunes (LoRA or full)")
    p.add_argument("paths", nargs="*", metavar="PATH", help="LoRA adapter or full model directories")
    p.add_argument("--manifest", metavar="FILE",
                   help="JSONL/CSV of path, id, tags: resumable; bad items listed, exit 1")  # fmt: skip
    p.add_argument("--failures", metavar="FILE", help="with --manifest: write the failed items here (JSONL)")
    p.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                   help="with --manifest: embed on Ray Data (a cluster ADDRESS, or a local Ray)")  # fmt: skip
    p.add_argument("--ray-workers", type=POSITIVE, default=2, help="--ray: embedding actors (default 2)")
    p.add_argument("--ray-cpus", type=float, default=0.5, help="--ray: CPUs per actor (default 0.5)")
    p.add_argument("--ray-gpus", type=float, default=0.0, help="--ray: GPUs per actor (default 0)")
    p.add_argument("--index", help="also add the embeddings to this index directory")
    p.add_argument("--out", help="write the embeddings (with vectors) to this JSON file")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    _add_index_write_options(p)
    add_embedding_options(p)
    p.set_defaults(func=cmd_embed)

    index = sub.add_parser("index", help="manage a model index").add_subparsers(dest="action", required=True)
    p = index.add_parser("add", parents=[common], help="embed finetunes and add them")
    p.add_argument("paths", nargs="+", metavar="PATH", help="LoRA adapter or full model directories")
    _add_index_write_options(p)
    add_embedding_options(p)
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
    add_embedding_options(p)
    p.set_defaults(func=cmd_index_search)
    p.add_argument(
        "--where", action="append", metavar="KEY=VALUE", help="only models with this tag (repeatable)"
    )
    p = index.add_parser("info", parents=[common], help="size, kind and embedding space")
    p.set_defaults(func=cmd_index_info)
    p = index.add_parser("migrate", parents=[common], help="convert an index of format 1 (meta.json) once")
    p.set_defaults(func=cmd_index_migrate)
    for action in index.choices.values():
        action.add_argument("--index", required=True, help="index directory")
