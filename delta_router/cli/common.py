"""What the command groups share: output, argument types and common options, the embedder from flags."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from delta_router.embedding.embedder import METHODS, NORMALIZATIONS, POOLINGS, DeltaEmbedder
from delta_router.embedding.probes import BUILTIN_PROBE_SETS
from delta_router.errors import DataError, DeltaRouterError
from delta_router.models.base import DEFAULT_BASE, EMBEDDED_BASES, resolve_device
from delta_router.search.index import ModelIndex

console = Console()


def emit(args: argparse.Namespace, payload, table: Table | None = None) -> None:
    """``payload`` as JSON with ``--json``, else ``table`` (if any) on the console."""
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    elif table is not None:
        console.print(table)


def parse_tags(pairs: Sequence[str] | None, option: str = "--tag") -> dict[str, str]:
    """``KEY=VALUE`` strings (of ``option``, for messages) as a dict."""
    tags = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DeltaRouterError(f"{option} expects KEY=VALUE, got {pair!r}")
        tags[key] = value
    return tags


def index_inputs(index: ModelIndex, index_dir: str) -> tuple[str, ...]:
    """What a command over an index reads, which its ``--out`` must not replace: the index, its
    base's directory (a local one) and every indexed model's files."""
    base = index.space.base_name if index.space is not None else ""
    local_base = (base,) if base and Path(base).is_dir() else ()
    return (index_dir, *local_base, *index.paths())


def embedder_from_args(args: argparse.Namespace, index: ModelIndex | None = None) -> DeltaEmbedder:
    """Embedder from the flags; flags left unset follow an existing index's embedding space."""
    space = index.space if index is not None else None

    def pick(flag: str, from_space, default):
        value = getattr(args, flag)
        if value is not None:
            return value
        return from_space if space is not None else default

    probes = pick("probes", space.probe_spec if space else None, "paper")
    older_index = isinstance(probes, str) and probes not in BUILTIN_PROBE_SETS  # no stored probe texts
    if space is not None and args.probes is None and older_index:
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


def selection_table(selection, title: str) -> Table:
    table = Table(title=title)
    for col in ("rank", "model id", "cosine", "tags"):
        table.add_column(col)
    for hit in selection.hits:
        tags = ", ".join(f"{k}={v}" for k, v in hit.entry.tags.items())
        table.add_row(str(hit.rank), hit.model_id, f"{hit.score:.4f}", tags)
    return table


# ---- argument types and shared options -----------------------------------------------------------
def int_at_least(low: int, high: int | None = None):
    """argparse type: an integer >= ``low`` (and <= ``high``), checked before any compute."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


def float_in(low: float, high: float | None = None, low_open: bool = False):
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


def device_type(text: str) -> str:
    """argparse type: a torch device this machine has (checked before any loading)."""
    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


POSITIVE = int_at_least(1)
NON_NEGATIVE = int_at_least(0)
PORT = int_at_least(1, 65535)


def add_embedding_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("embedding (defaults: the paper's method, or the index's settings)")
    g.add_argument("--base", help=f"embedded name ({', '.join(EMBEDDED_BASES)}), dir or HF id")
    g.add_argument("--probes", help=f"built-in set ({', '.join(BUILTIN_PROBE_SETS)}) or .json/.jsonl")
    g.add_argument("--layer", type=int, help="hidden_states index; -1 = final post-norm (default)")
    g.add_argument("--pooling", choices=POOLINGS, help="token pooling (default: last)")
    g.add_argument("--normalize", choices=NORMALIZATIONS, help="per-probe normalisation")
    g.add_argument("--method", choices=METHODS, default="batched", help="compute path (default: batched)")


def add_base_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base", default=DEFAULT_BASE, help=f"embedded name, dir or HF id (default {DEFAULT_BASE})"
    )


def add_zoo_option(p: argparse.ArgumentParser, default: str | None) -> None:
    shown = f" (default {default})" if default else ""
    p.add_argument(
        "--zoo", "--spec", dest="zoo", default=default, help=f"zoo: small, full, wild, wild-small{shown}"
    )


def load_router(args: argparse.Namespace):
    """The ``--router`` of ``--method queries``, which needs one (other methods refuse one: None)."""
    if args.router is None:
        if args.method == "queries":
            raise DataError(
                "--method queries needs --router DIR, a router of the index's models "
                "(delta-router route fit --index DIR --data-free --out ROUTER)"
            )
        return None
    if args.method != "queries":
        raise DataError(f"--router ranks by queries: it needs --method queries, not {args.method}")
    from delta_router.routing.router import Router

    return Router.load(args.router)
