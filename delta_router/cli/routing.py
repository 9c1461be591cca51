"""``route`` and ``serve``: fit and query a router, serve an index over HTTP."""

from __future__ import annotations

import argparse
import json
import socket
from collections.abc import Sequence

from rich.table import Table

from delta_router.cli.common import (
    PORT,
    POSITIVE,
    add_zoo_option,
    console,
    device_type,
    emit,
    float_in,
    index_inputs,
)
from delta_router.embedding.embedder import POOLINGS
from delta_router.errors import DeltaRouterError
from delta_router.home import refuse_existing
from delta_router.models.base import resolve_base
from delta_router.routing.data_free import (
    DEFAULT_ALPHA,
    DEFAULT_PROFILE_DELTAS,
    DEFAULT_SHRINKAGE,
    PROFILE_DELTAS,
)
from delta_router.routing.router import DEFAULT_THRESHOLD
from delta_router.search.index import ModelIndex


def _router_examples(args: argparse.Namespace) -> dict[str, list[str]]:
    from delta_router.data import load_records
    from delta_router.routing.router import query_text

    examples = {}
    for pair in args.examples or []:
        model_id, sep, path = pair.partition("=")
        if not sep:
            raise DeltaRouterError(f"--examples expects MODEL_ID=FILE, got {pair!r}")
        examples[model_id] = [query_text(r) for r in load_records(path)[: args.per_model]]
    return examples


def cmd_route_fit(args: argparse.Namespace) -> None:
    from delta_router.routing.router import QueryEncoder, Router
    from delta_router.zoo.zoo import Zoo

    if args.data_free:
        return _fit_data_free(args)
    data_free_options = {"--reference-zoo": args.reference_zoo, "--profile-deltas": args.profile_deltas,
                         "--map-alpha": args.map_alpha, "--shrinkage": args.shrinkage,
                         "--no-background": args.no_background or None}  # fmt: skip
    given = [flag for flag, value in data_free_options.items() if value is not None]
    if given:
        raise DeltaRouterError(f"{' and '.join(given)} only apply with --data-free")
    if bool(args.zoo) == bool(args.examples):
        raise DeltaRouterError(
            "give the models' examples (--zoo NAME or --examples MODEL_ID=FILE ...) or --data-free"
        )
    index = ModelIndex.load(args.index)
    examples = _router_examples(args)
    unknown = [m for m in examples if m not in index]
    if unknown:
        raise DeltaRouterError(f"not in the index {args.index}: {', '.join(unknown)}")
    if index.space is None:
        raise DeltaRouterError(f"{args.index} is empty: add models before fitting a router")
    example_files = [pair.partition("=")[2] for pair in args.examples or []]
    refuse_existing(args.out, args.force, inputs=(*index_inputs(index, args.index), *example_files))
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
    emit(args, {"router": args.out, "models": router.model_ids}, _ids_table(router.model_ids, args.out))


def _fit_data_free(args: argparse.Namespace) -> None:
    """``route fit --data-free``: profiles from the indexed vectors, mapped by a reference zoo."""
    from delta_router.routing.data_free import (
        fit_data_free,
        nearest_references,
        reference_domains,
        reference_pairs,
    )
    from delta_router.routing.router import QueryEncoder
    from delta_router.zoo.zoo import Zoo

    if args.examples or args.zoo:
        raise DeltaRouterError("--data-free uses no examples: drop --zoo / --examples (see --reference-zoo)")
    reference_zoos = args.reference_zoo or ["full"]
    profile_deltas = args.profile_deltas or DEFAULT_PROFILE_DELTAS
    index = ModelIndex.load(args.index)
    if index.space is None:
        raise DeltaRouterError(f"{args.index} is empty: add models before fitting a router")
    refuse_existing(args.out, args.force, inputs=index_inputs(index, args.index))
    base = resolve_base(index.space.base_name)
    zoos = [Zoo(name, base, progress=False) for name in dict.fromkeys(reference_zoos)]
    encoder = QueryEncoder.for_model(base.load_model(), base.load_tokenizer(), pooling=args.pooling)
    space = (index.space, f"the index {args.index}")
    deltas, reference = reference_pairs(zoos, encoder, profile_deltas, not args.json, space)
    shrinkage = {None: DEFAULT_SHRINKAGE, "none": None}.get(args.shrinkage, args.shrinkage)
    alpha = DEFAULT_ALPHA if args.map_alpha is None else args.map_alpha
    map_options = {"alpha": alpha, "shrinkage": shrinkage}
    router = fit_data_free(index, deltas, reference, deltas=profile_deltas, progress=not args.json,
                           background=not args.no_background, **map_options)  # fmt: skip
    router.save(args.out, force=args.force)
    domain_of = reference_domains(zoos)
    mapped_as = zip(router.model_ids, nearest_references(router, reference), strict=True)
    nearest = {
        model_id: {"reference": ref_id, "domain": domain_of[ref_id], "cosine": round(cosine, 4)}
        for model_id, (ref_id, cosine) in mapped_as
    }
    payload = {"router": args.out, "models": router.model_ids, "reference_zoos": [z.spec.name for z in zoos],
               "profile_deltas": profile_deltas, "background": not args.no_background, **map_options,
               "nearest_reference": nearest}  # fmt: skip
    names = "+".join(zoo.spec.name for zoo in zoos)
    title = f"data-free router at {args.out}: {len(router.model_ids)} models, as the map on {names} sees them"
    table = Table(title=title)
    for column in ("model id", "nearest reference finetune", "its domain", "cosine"):
        table.add_column(column)
    for model_id, row in nearest.items():
        table.add_row(model_id, row["reference"], row["domain"], f"{row['cosine']:.2f}")
    emit(args, payload, table)


def shrinkage_type(text: str) -> float | str:
    """argparse type of ``--shrinkage``: a share > 0, or ``none`` (no whitening)."""
    return text if text == "none" else float_in(0.0, low_open=True)(text)


def _overrides(args: argparse.Namespace) -> dict:
    """``--top-k``, and ``--threshold`` only when given (else the router's own)."""
    return {"top_k": args.top_k} | ({} if args.threshold is None else {"threshold": args.threshold})


def _ids_table(ids: Sequence[str], where: str) -> Table:
    table = Table(title=f"router at {where}: {len(ids)} models")
    table.add_column("model id")
    for model_id in ids:
        table.add_row(model_id)
    return table


def cmd_route_query(args: argparse.Namespace) -> None:
    from delta_router.routing.router import QueryEncoder, Router

    router = Router.load(args.router, **_overrides(args))
    base = resolve_base(router.base_name)
    router.check_base(base.fingerprint, f"base {router.base_name}")
    encoder = QueryEncoder.for_model(base.load_model(), base.load_tokenizer(), **router.encoder_options)
    decisions = router.route(encoder, args.queries)
    table = Table(title="routing")
    for col in ("query", "served by", "weights", "best cosine"):
        table.add_column(col)
    for query, d in zip(args.queries, decisions, strict=True):
        served = d.target if d.fallback is None else f"{d.target} ({d.fallback})"
        table.add_row(query[:60], served, ", ".join(f"{w:.2f}" for w in d.weights), f"{d.score:.3f}")
    emit(args, [d.to_dict() | {"query": q} for q, d in zip(args.queries, decisions, strict=True)], table)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from delta_router.routing.router import Router
    from delta_router.serving import build_app

    if not args.router and (args.top_k != 1 or args.threshold is not None):
        raise DeltaRouterError("--top-k and --threshold set how the router routes: give --router DIR")
    listener = _listen(args.host, args.port)  # a busy port fails here, before any loading
    router = Router.load(args.router, **_overrides(args)) if args.router else None
    index = ModelIndex.load(args.index)
    app = build_app(
        index, router, args.backend, args.max_loaded, args.max_batch, args.max_tokens, args.device,
        index_dir=args.index,
    )  # fmt: skip
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


def add_commands(sub, common: argparse.ArgumentParser) -> None:
    """``route fit``, ``route query`` and ``serve``."""
    route = sub.add_parser("route", help="route queries to the best finetune").add_subparsers(
        dest="action", required=True
    )
    p = route.add_parser("fit", parents=[common], help="task profiles of an index's models")
    p.add_argument("--index", required=True, help="index directory")
    p.add_argument("--out", required=True, help="router directory to write")
    add_zoo_option(p, None)
    p.add_argument("--examples", action="append", metavar="MODEL_ID=FILE", help="examples of a model's task")
    p.add_argument("--per-model", type=POSITIVE, default=32, help="examples per model (default 32)")
    p.add_argument("--pooling", choices=POOLINGS, default="mean", help="token pooling (default: mean)")
    p.add_argument("--data-free", action="store_true",
                   help="profile every indexed model from its files alone (no examples)")  # fmt: skip
    p.add_argument("--reference-zoo", nargs="+", metavar="NAME",
                   help="--data-free: the built zoo(s) whose data fit the map (default full; "
                        "several: one reference of all their finetunes)")  # fmt: skip
    p.add_argument("--profile-deltas", choices=PROFILE_DELTAS,
                   help="--data-free: what the map reads of each model: formats = the paper's probes in "
                        "every prompt format, a forward pass per model; plain = 15 generic probes in no "
                        "template (as costly); formats+plain = both, one map each, averaged (default, "
                        "two passes); index = the index's vectors, no forward pass (huge indexes of "
                        "one prompt format)")  # fmt: skip
    p.add_argument(
        "--map-alpha",
        type=float_in(0.0, low_open=True),
        metavar="ALPHA",
        help=f"--data-free: the map's ridge penalty (default {DEFAULT_ALPHA})",
    )
    p.add_argument("--shrinkage", type=shrinkage_type,
                   help=f"--data-free: how far the map's whitening of the deltas is shrunk toward isotropy, "
                        f"a share of their mean variance (default {DEFAULT_SHRINKAGE}; 'none': not whitened, "
                        "the map before 2026-12-07)")  # fmt: skip
    p.add_argument("--no-background", action="store_true",
                   help="--data-free: send a query to the base only below the threshold, not also when it "
                        "matches a reference task too few indexed models cover")  # fmt: skip
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
    serve.add_argument("--device", type=device_type, default="cpu", help="torch device of the peft backend")
    serve.add_argument("--max-loaded", type=POSITIVE, default=8, help="adapters kept loaded (LRU)")
    serve.add_argument("--max-batch", type=POSITIVE, default=8, help="requests per batched forward")
    serve.add_argument("--max-tokens", type=POSITIVE, default=512, help="largest max_tokens accepted")
    serve.set_defaults(func=cmd_serve)
    for p in (query, serve):
        p.add_argument("--top-k", type=POSITIVE, default=1, help="adapters per query (weighted mix if > 1)")
        p.add_argument(
            "--threshold",
            type=float_in(-1.0, 1.0),
            help=f"best cosine below this -> the base (default: the router's own, {DEFAULT_THRESHOLD} if "
            "fitted; -1: never)",
        )
