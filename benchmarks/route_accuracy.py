"""Routing accuracy and downstream accuracy of routed answers on the real zoo.

Candidates: the zoo's single-domain finetunes (21 for ``full``). Queries: held-out test records of
every domain (no finetune saw them). A routing decision is correct when the chosen adapter has the
query's domain; the oracle is always correct, so "% of oracle" is the accuracy itself.

Methods, in one run:
- ``router (pooling, tokens)``: ``Router`` profiles from 32 training prompts per model, query =
  one base forward over its first ``tokens`` tokens, mean / last-token pooling;
- ``arrow``: PEFT's Arrow (per-token routing over the same adapters, top_k=3); its decision for a
  query is the adapter with the largest routing weight summed over tokens and layers;
- ``data-free (LODO)``: profiles predicted from each adapter's profile deltas alone
  (``routing.data_free.profile_deltas``, ``--profile-deltas``), the map fitted on the other domains'
  adapters (leave one domain out), one row per ridge ``alpha``, and one of the map before its deltas
  were whitened (alpha 0.01, no whitening: the default until 2026-12-07); queries encoded as the
  default router encodes them;
- ``data-free (map on REF)`` and ``(map on REF + zoo, LODO)`` (``--reference-zoo REF ...``): the map
  fitted on other zoos' pairs, as ``route fit --data-free --reference-zoo REF`` fits it (no finetune of
  this zoo in the reference), and on those plus this zoo's finetunes of the other domains;
- ``random``: a uniformly random adapter (expected accuracy 1 / #domains).

Abstention (``--abstention PNG``): each domain in turn is withheld from the router (its adapters
removed); over thresholds on the best cosine, the share of the withheld domain's queries sent to
the base against the in-zoo accuracy (right adapter and not sent to the base), averaged over the
withheld domains, for the default router and the data-free one (default alpha, its profiles centred
on the kept models' mean as ``fit_data_free`` centres an index's); a table and a plot. Mapped by
``--reference-zoo``, each data-free curve is drawn twice: by the threshold alone, and with the
reference zoos' profiles as the router's ``Background`` (as ``fit_data_free`` fits it): a query of a
reference task no kept model covers goes to the base too. ``--dev`` routes dev queries instead of
test records, to choose settings on.

Downstream (``--downstream N`` test records per domain): multiple-choice accuracy (or minus the
answer's NLL per token for math/code), mean per record with a 95% Student-t interval, of the base,
a random adapter, the router's top-1 adapter, the data-free router's (leave one domain out, default
alpha), Arrow, and the oracle (the domain's part-0 adapter; on ``wild`` its strong member).

    python benchmarks/route_accuracy.py                 # full zoo, 40 queries/domain, 40 downstream
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import time
from collections import defaultdict
from datetime import date
from pathlib import Path

import numpy as np
import torch

from delta_router import Zoo
from delta_router.errors import DeltaRouterError
from delta_router.evaluation.clustering import silhouette
from delta_router.evaluation.scoring import example_scores
from delta_router.evaluation.verification import Interval
from delta_router.home import atomic_write_text, refuse_existing_file
from delta_router.routing.data_free import (
    COVER_ALPHA,
    DATA_FREE_THRESHOLD,
    DEFAULT_ALPHA,
    DEFAULT_PROFILE_DELTAS,
    DEFAULT_SHRINKAGE,
    PROFILE_DELTAS,
    centred_profiles,
    delta_blocks,
    leave_one_group_out,
    mapped_profiles,
    profile_deltas,
    reference_pairs,
)
from delta_router.routing.router import (
    DEFAULT_THRESHOLD,
    Background,
    QueryEncoder,
    ReferencePairs,
    Router,
    mean_queries,
    query_text,
    zoo_examples,
)


class ArrowVotes:
    """Sums Arrow's per-token routing weights per adapter over all layers (forward hooks)."""

    def __init__(self, model, n_experts: int):
        from peft.tuners.lora.arrow import ArrowLoraLinearLayer

        self.totals = torch.zeros(n_experts)
        self.handles = [
            m.register_forward_hook(self._hook, with_kwargs=True)
            for m in model.modules()
            if isinstance(m, ArrowLoraLinearLayer)
        ]

    def _hook(self, module, args, kwargs, output) -> None:
        x = args[0] if args else kwargs["x"]
        tok = x.reshape(-1, x.shape[-1]).to(module.prototypes.dtype)
        sim = (tok @ module.prototypes.T).abs()
        top, idx = torch.topk(sim, module.top_k, dim=1)
        full = torch.full_like(sim, float("-inf")).scatter(1, idx, top)
        self.totals += torch.softmax(full / module.temperature, dim=1).sum(0).float().cpu()

    def take(self) -> int:
        winner = int(self.totals.argmax())
        self.totals.zero_()
        return winner


THRESHOLDS = np.round(np.arange(0.0, 0.61, 0.01), 2)


def abstention_curve(
    router_without, features, labels: list[str], domain_of: dict[str, str]
) -> tuple[list[tuple], dict[str, list[float]]]:
    """(threshold, withheld queries sent to the base, in-zoo accuracy, points of it lost against
    top-1 routing with no fallback at all), averaged over withheld domains; and per withheld domain,
    the share of its queries sent to the base at each threshold (``THRESHOLDS``).

    ``router_without(withheld)``: a ``Router`` over the models of every other domain, fitted as if the
    withheld domain's did not exist (its finetunes in no population, centre or reference); with a
    background, a query it claims goes to the base too. ``features``: the encoded queries ``[Q, d]``;
    ``domain_of``: each model's domain."""
    labels_arr = np.asarray(labels)
    per_withheld = {}
    for withheld in sorted(set(labels)):
        router = router_without(withheld)
        sims, claimed = router.assess(features)
        domains = np.asarray([domain_of[m] for m in router.model_ids])
        right = domains[sims.argmax(1)] == labels_arr
        per_withheld[withheld] = (np.where(claimed, -np.inf, sims.max(1)), right, labels_arr == withheld)
    runs = list(per_withheld.values())
    top1 = float(np.mean([ok[~outside].mean() for _, ok, outside in runs]))
    rows = []
    for threshold in THRESHOLDS:  # a claimed query's best is -inf: below every threshold
        to_base = [float((best[outside] < threshold).mean()) for best, _, outside in runs]
        accuracy = [float((ok & (best >= threshold))[~outside].mean()) for best, ok, outside in runs]
        mean = float(np.mean(accuracy))
        rows.append((float(threshold), float(np.mean(to_base)), mean, 100 * (top1 - mean)))
    by_domain = {
        withheld: [float((best[outside] < t).mean()) for t in THRESHOLDS]
        for withheld, (best, _, outside) in per_withheld.items()
    }
    return rows, by_domain


def map_label(alpha: float, shrinkage: float | None) -> str:
    """How a row names its map: the ridge, and the whitening where it is not the default."""
    if shrinkage == DEFAULT_SHRINKAGE:
        return f"alpha {alpha:g}"
    return f"alpha {alpha:g}, " + ("not whitened" if shrinkage is None else f"shrinkage {shrinkage:g}")


def best_within(rows: list[tuple], budget: float = 5.0) -> tuple | None:
    """The row of ``abstention_curve`` that sends the most withheld queries to the base at most
    ``budget`` points of in-zoo accuracy lost (None: every threshold costs more)."""
    within = [row for row in rows if row[3] <= budget]
    return max(within, key=lambda row: row[1]) if within else None


def profile_geometry(profiles: dict[str, np.ndarray], factors: dict[str, list[str]]) -> dict:
    """Silhouette (cosine) of each set of model vectors ``[M, d]`` by each factor (a label per model):
    whether a view of the finetunes groups by domain, and not by how they were made."""
    grouping = {factor: labels for factor, labels in factors.items() if len(set(labels)) > 1}
    return {
        name: {factor: silhouette(vectors, labels) for factor, labels in grouping.items()}
        for name, vectors in profiles.items()
    }


def cross_zoo_profiles(
    zoo_name: str,
    reference_name: str,
    reference: tuple[np.ndarray, Router],
    union: tuple[np.ndarray, Router, np.ndarray],
    encoder: QueryEncoder,
    own_ids: list[str],
    own_deltas: np.ndarray,
    groups: list[str],
    deltas: str,
    keep: np.ndarray | None = None,
    alpha: float = DEFAULT_ALPHA,
    shrinkage: float | None = DEFAULT_SHRINKAGE,
) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Data-free profiles of the zoo's models ``own_ids`` (of ``keep``, a mask; default all), centred
    ``[n, d]``, their covers ``[n, d]`` (``mapped_profiles``'), the centre of their query space and
    the reference zoos' profiles in it (``fit_data_free``'s background), mapped by other zoos' pairs
    (ridge ``alpha``, whitening ``shrinkage``): by ``reference``
    alone (``reference_pairs`` of the zoos ``reference_name``; as ``route fit --data-free
    --reference-zoo`` maps), and by ``union`` (``reference_pairs`` of them and this zoo, with each
    row's uncentred mean query ``[n, d]``) less this zoo's finetunes outside ``keep``, each domain's
    profiles predicted without its own finetunes (this zoo's part left out). The models outside
    ``keep`` are in no population, profile or centre: as if they did not exist. ``deltas``: the kind
    of ``own_deltas`` (``PROFILE_DELTAS``); ``encoder``: the union router's."""
    keep = np.ones(len(own_ids), dtype=bool) if keep is None else keep
    ref_deltas, ref = reference
    blocks = delta_blocks(deltas)
    population = np.vstack([ref_deltas, own_deltas[keep]])
    pairs = ReferencePairs(ref_deltas, ref.profiles, deltas, alpha, shrinkage)
    alone = mapped_profiles(pairs, own_deltas[keep], population)
    union_deltas, union_router, union_means = union
    own_rows = [union_router.model_ids.index(f"{zoo_name}_{m}") for m in own_ids]
    rows = [i for i in range(len(union_deltas)) if i not in own_rows]  # the reference zoos' finetunes
    kept_rows = rows + [row for row, kept in zip(own_rows, keep, strict=True) if kept]
    union_groups = [""] * len(rows) + [g for g, kept in zip(groups, keep, strict=True) if kept]
    kept_ids = [union_router.model_ids[i] for i in kept_rows]
    kept_union = Router.from_means(kept_ids, union_means[kept_rows], encoder, union_router.base_fingerprint)

    def lodo(a: float, s: float | None) -> np.ndarray:  # this zoo's part, centred
        own = leave_one_group_out(union_deltas[kept_rows], kept_union.profiles, union_groups, a, blocks, s)
        return centred_profiles(own[len(rows) :])

    with_own = lodo(alpha, shrinkage)
    with_own_covers = with_own if shrinkage is None else lodo(COVER_ALPHA, None)  # as mapped_profiles
    return {
        f"data-free (map on {reference_name})": (*alone, ref.center, ref.profiles),
        f"data-free (map on {reference_name} + {zoo_name}, LODO)": (
            with_own,
            with_own_covers,
            kept_union.center,
            kept_union.profiles[: len(rows)],
        ),
    }


def plot_abstention(curves: dict[str, tuple], path: str) -> dict:
    """Print each curve (``abstention_curve``'s) as a table, with its best trade within 5 points and
    each withheld domain's share there; plot accuracy lost against withheld queries sent to the base.
    Returns what the JSON keeps of each curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from delta_router.evaluation.clustering import save_figure

    fig, ax = plt.subplots(figsize=(5.5, 4))
    summary = {}
    for name, (rows, by_domain) in curves.items():
        print(f"\n{name}: | threshold | withheld -> base | in-zoo accuracy | lost (points) |")
        print("|---|---|---|---|")
        for t, to_base, acc, loss in rows:
            if round(100 * t) % 5 == 0 or t in (DEFAULT_THRESHOLD, DATA_FREE_THRESHOLD):
                print(f"| {t:.2f} | {to_base:.0%} | {acc:.1%} | {loss:.1f} |")
        best = best_within(rows)
        keys = ("threshold", "to_base", "accuracy", "lost")
        summary[name] = {"rows": [dict(zip(keys, row, strict=True)) for row in rows]}
        if best:
            t, to_base, _, loss = best
            column = [round(float(x), 2) for x in THRESHOLDS].index(round(t, 2))
            shares = {d: shares[column] for d, shares in by_domain.items()}
            print(f"most to the base within 5 points: {t:.2f}, {to_base:.0%} for {loss:.1f} points; by "
                  "withheld domain: " + ", ".join(f"{d} {x:.0%}" for d, x in shares.items()))  # fmt: skip
            summary[name]["best within 5 points"] = {"threshold": t, "to_base": to_base, "lost": loss,
                                                     "to_base by withheld domain": shares}  # fmt: skip
        else:
            print("most to the base within 5 points: none (every threshold costs more)")
        ax.plot([100 * b for _, b, _, _ in rows], [x for *_, x in rows], marker="o", markersize=2, label=name)
        for t, b, _, loss in rows:
            if round(100 * t) % 5 == 0:
                ax.annotate(f"{t:.2f}", (100 * b, loss), fontsize=6)
    ax.axvline(80, color="grey", linestyle="--", linewidth=1)
    ax.axhline(5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("withheld domain's queries sent to the base (%)")
    ax.set_ylabel("in-zoo routing accuracy lost (points)")
    ax.set_title("Abstention by best-cosine threshold (and background)")
    ax.legend(fontsize=7)
    save_figure(fig, path)
    print(f"\nplot: {path}")
    return summary


def arrow_model(zoo, paths: list[str]):
    """PEFT's Arrow over ``paths`` (top_k=3), in eval mode."""
    from peft import ArrowConfig, create_arrow_model

    config = ArrowConfig(top_k=3, router_temperature=1.0)
    return create_arrow_model(zoo.base.load_model(), paths, config).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="full")
    parser.add_argument("--queries", type=int, default=40, help="test records per domain to route")
    parser.add_argument("--offset", type=int, default=0,
                        help="route records OFFSET.. of the split (e.g. 40: test records no default run "
                        "routes, to confirm a choice made on --dev)")  # fmt: skip
    parser.add_argument("--dev", action="store_true",
                        help="route dev queries instead (few-shot pool records 60-99, which nothing else "
                        "reads): for choosing settings")  # fmt: skip
    parser.add_argument("--downstream", type=int, default=40, help="test records per domain to score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=["mean:256", "last:256", "mean:128", "mean:64"],
                        help="router variants POOLING:TOKENS (mean:128 is the default router)")  # fmt: skip
    parser.add_argument("--no-arrow", action="store_true", help="skip PEFT's Arrow (minutes)")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.001, 0.01, 0.03, 0.1])
    parser.add_argument("--map-alpha", type=float, default=DEFAULT_ALPHA,
                        help="the ridge alpha of every data-free map but the sweep's")  # fmt: skip
    parser.add_argument("--shrinkage", type=lambda v: None if v == "none" else float(v),
                        default=DEFAULT_SHRINKAGE,
                        help="the maps' whitening shrinkage ('none': not whitened; ProfileMap)")  # fmt: skip
    parser.add_argument("--profile-deltas", choices=PROFILE_DELTAS, default=DEFAULT_PROFILE_DELTAS,
                        help="what the data-free map reads (see routing.data_free)")  # fmt: skip
    parser.add_argument("--reference-zoo", nargs="+", metavar="NAME",
                        help="data-free rows mapped by these built zoos: by them alone, and by them "
                        "plus this zoo's other domains")  # fmt: skip
    parser.add_argument("--abstention", metavar="PNG", help="withheld-domain abstention curve, plotted here")
    parser.add_argument(
        "--json", metavar="FILE", help="also write the accuracies here (e.g. reports/wild/routing.json)"
    )
    parser.add_argument("--force", action="store_true", help="overwrite existing --json / --abstention files")
    args = parser.parse_args()
    try:  # before minutes of compute, not after
        for option in ("--json", "--abstention"):
            if getattr(args, option[2:]):
                refuse_existing_file(getattr(args, option[2:]), args.force, option)
    except DeltaRouterError as error:
        parser.error(str(error))
    if args.offset < 0:
        parser.error(f"--offset is a record number >= 0, got {args.offset}")
    if args.zoo in (args.reference_zoo or []):
        parser.error(f"--reference-zoo {args.zoo} is the routed zoo itself: give other zoos")
    rng = random.Random(args.seed)

    zoo = Zoo(args.zoo, progress=False)
    members = [m for m in zoo.spec.members() if m.kind == "domain"]
    paths = {m.id: str(zoo.adapter_dir(m)) for m in members}
    domain_of = {m.id: m.label for m in members}
    tests = {d: zoo.splits(d).test for d in zoo.spec.domains}
    routed_records = {d: zoo.splits(d).fewshot[60:] if args.dev else tests[d] for d in zoo.spec.domains}
    window = slice(args.offset, args.offset + args.queries)
    queries = [(d, r) for d in zoo.spec.domains for r in routed_records[d][window]]
    short = [d for d in zoo.spec.domains if not routed_records[d][window]]
    if short:
        parser.error(f"--offset {args.offset} is past the last record to route of {', '.join(short)}")
    texts = [query_text(r) for _, r in queries]
    print(f"# route_accuracy  {date.today()}  {platform.machine()}  {torch.get_num_threads()} threads")
    kind = ("dev" if args.dev else "held-out") + (f" (from record {args.offset})" if args.offset else "")
    print(f"zoo {args.zoo}: {len(members)} single-domain adapters, {len(queries)} {kind} queries\n")

    model, tokenizer = zoo.base.load_model(), zoo.base.load_tokenizer()
    decisions: dict[str, list[str]] = {}
    seconds: dict[str, float] = {}
    routers, features, encoder_of, means = {}, {}, {}, {}
    examples = zoo_examples(zoo)
    for setting in args.settings:
        pooling, max_length = setting.split(":")[0], int(setting.split(":")[1])
        name = f"router ({pooling}, {max_length} tokens)"
        encoder = encoder_of[name] = QueryEncoder.for_model(
            model, tokenizer, pooling=pooling, max_length=max_length
        )
        clock = time.perf_counter()
        means[name] = mean_queries(encoder, examples)  # top-1 accuracy (no threshold); abstention: below
        routers[name] = Router.from_means(
            list(examples), means[name], encoder, zoo.base.fingerprint, threshold=None
        )
        fit_s = time.perf_counter() - clock
        clock = time.perf_counter()
        features[name] = encoder(texts)
        routed = routers[name].decide(features[name])
        seconds[name] = (time.perf_counter() - clock) / len(texts)
        decisions[name] = [d.adapters[0] for d in routed]
        print(f"{name}: profiles in {fit_s:.1f}s")

    ids = [m.id for m in members]
    default = "router (mean, 128 tokens)"
    views: dict[str, np.ndarray] = {}  # model vectors whose grouping is reported (profile geometry)
    abstention: dict = {}
    if default in routers:  # data-free: the default router's query space, profiles from deltas alone
        reference = routers[default]
        fingerprint = reference.base_fingerprint
        deltas = profile_deltas(zoo.load_index(), reference.model_ids, args.profile_deltas, zoo.base)
        groups = [domain_of[i] for i in reference.model_ids]
        blocks = delta_blocks(args.profile_deltas)
        views[f"profile deltas ({args.profile_deltas}), what the map reads"] = deltas
        views[f"{default}: data-based profiles"] = reference.profiles
        alpha, shrinkage = args.map_alpha, args.shrinkage  # the map of every other data-free row
        shipped_map = f"data-free (LODO, {map_label(alpha, shrinkage)})"
        maps = dict.fromkeys([*((a, shrinkage) for a in sorted({*args.alphas, alpha})), (0.01, None)])
        for a, s in maps:
            predicted = leave_one_group_out(deltas, reference.profiles, groups, a, blocks, s)
            free = Router(reference.model_ids, centred_profiles(predicted), reference.center, fingerprint)
            routed = free.decide(features[default])
            decisions[f"data-free (LODO, {map_label(a, s)})"] = [d.adapters[0] for d in routed]
            if (a, s) == (alpha, shrinkage):
                routers[shipped_map] = free
                views[shipped_map] = free.profiles
        crossed_without = None
        if args.reference_zoo:
            references = [Zoo(name, progress=False) for name in args.reference_zoo]
            reference_alone, (union_deltas, union_router) = (
                reference_pairs(zoos, encoder_of[default], args.profile_deltas)
                for zoos in (references, [*references, zoo])
            )
            union_means = np.vstack([  # the union router's rows, uncentred: re-centred without a domain
                means[default] if other is zoo else mean_queries(encoder_of[default], zoo_examples(other))
                for other in sorted([*references, zoo], key=lambda z: z.spec.name)
            ])  # fmt: skip
            union_ids = union_router.model_ids
            refitted = Router.from_means(union_ids, union_means, encoder_of[default], fingerprint)
            if not np.allclose(refitted.profiles, union_router.profiles, atol=1e-4):
                raise DeltaRouterError("the cached union reference router does not match its zoos' prompts")
            names = "+".join(z.spec.name for z in references)

            @functools.cache  # each abstention curve asks for every withheld domain's, twice
            def crossed_without(withheld: str | None = None) -> dict:
                """``cross_zoo_profiles`` with the ``withheld`` domain's finetunes absent (None: all in)."""
                keep = np.asarray(groups) != withheld
                return cross_zoo_profiles(
                    zoo.spec.name,
                    names,
                    reference_alone,
                    (union_deltas, union_router, union_means),
                    encoder_of[default],
                    reference.model_ids,
                    deltas,
                    groups,
                    args.profile_deltas,
                    keep,
                    alpha,
                    shrinkage,
                )

            for name, (profiles, _, centre, _) in crossed_without().items():
                free = Router(reference.model_ids, profiles, centre, fingerprint)
                decisions[name] = [d.adapters[0] for d in free.decide(features[default])]
                views[name] = free.profiles
        if args.abstention:  # the default alpha's curve, whichever --alphas are listed
            domains = np.asarray(groups)
            encoder = encoder_of[default]

            def data_based(withheld: str) -> Router:  # fitted on the other domains' examples alone
                kept = domains != withheld
                kept_ids = [m for m, k in zip(reference.model_ids, kept, strict=True) if k]
                return Router.from_means(kept_ids, means[default][kept], encoder, fingerprint, threshold=None)

            def data_free(withheld: str) -> Router:  # its map learns from the kept domains alone
                data, kept = data_based(withheld), domains != withheld
                predicted = leave_one_group_out(
                    deltas[kept], data.profiles, list(domains[kept]), alpha, blocks, shrinkage
                )
                return Router(data.model_ids, centred_profiles(predicted), data.center, fingerprint)

            def crossed(withheld: str, name: str, background: bool) -> Router:
                profiles, covers, centre, theirs = crossed_without(withheld)[name]
                kept_ids = [m for m in reference.model_ids if domain_of[m] != withheld]
                return Router(
                    kept_ids,
                    profiles,
                    centre,
                    fingerprint,
                    background=Background(theirs) if background else None,
                    covers=covers,
                )

            labels = [d for d, _ in queries]
            curves = {
                default: abstention_curve(data_based, features[default], labels, domain_of),
                shipped_map: abstention_curve(data_free, features[default], labels, domain_of),
            }
            for name in crossed_without() if crossed_without else ():
                for background in (False, True):
                    curves[name + (", background" if background else "")] = abstention_curve(
                        lambda w, n=name, b=background: crossed(w, n, b), features[default], labels, domain_of
                    )
            abstention = plot_abstention(curves, args.abstention)
    decisions["random"] = [rng.choice(ids) for _ in texts]
    arrow = None if args.no_arrow else arrow_model(zoo, [paths[i] for i in ids])
    if arrow is not None:
        votes = ArrowVotes(arrow, len(ids))
        clock = time.perf_counter()
        decisions["arrow"] = []
        for text in texts:
            batch = tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                arrow.get_base_model().get_decoder()(**batch)
            decisions["arrow"].append(ids[votes.take()])
        seconds["arrow"] = (time.perf_counter() - clock) / len(texts)

    print("\n| method | " + " | ".join(zoo.spec.domains) + " | all | s/query |")
    print("|---|" + "---|" * (len(zoo.spec.domains) + 2))
    accuracy = {}
    for method, chosen in decisions.items():
        right = defaultdict(list)
        for (domain, _), model_id in zip(queries, chosen, strict=True):
            right[domain].append(domain_of[model_id] == domain)
        accuracy[method] = float(np.mean([c for per in right.values() for c in per]))
        cells = [f"{np.mean(right[d]):.0%}" for d in zoo.spec.domains]
        cost = seconds.get(method, 0.0)
        print(f"| {method} | " + " | ".join(cells) + f" | **{accuracy[method]:.1%}** | {cost:.3f} |")
    print("\noracle = 100%: each router's accuracy is its fraction of the oracle's")
    geometry = {}
    if views:  # rows follow the default router's model ids
        tags = {entry.model_id: entry.tags for entry in zoo.load_index().list()}
        model_ids = routers[default].model_ids
        factors = {f: [str(tags[m].get(f, "")) for m in model_ids] for f in ("format", "dataset", "rank")}
        geometry = profile_geometry(views, {"domain": [domain_of[m] for m in model_ids], **factors})
        columns = list(dict.fromkeys(f for row in geometry.values() for f in row))
        print("\nsilhouette (cosine) of each view of the finetunes, by factor")
        print("\n| view | " + " | ".join(columns) + " |")
        print("|---|" + "---|" * len(columns))
        for name, row in geometry.items():
            print(f"| {name} | " + " | ".join(f"{row[c]:+.3f}" if c in row else "-" for c in columns) + " |")
    if args.json:
        summary = {"zoo": args.zoo, "queries": len(queries), "adapters": len(ids), "accuracy": accuracy,
                   "silhouette": geometry, "abstention": abstention}  # fmt: skip
        atomic_write_text(Path(args.json), json.dumps(summary, indent=2))

    if args.downstream <= 0:
        return
    # ---- downstream: score each domain's records with the adapter each method picks ----------
    from peft import PeftModel

    from delta_router.evaluation.harness import load_for_eval
    from delta_router.models.finetunes import Finetune

    full = {m for m in ids if Finetune.open(paths[m]).kind == "full"}  # wild: a few full finetunes
    adapters = [m for m in ids if m not in full]
    served = PeftModel.from_pretrained(model, paths[adapters[0]], adapter_name=adapters[0]).eval()
    for model_id in adapters[1:]:
        served.load_adapter(paths[model_id], adapter_name=model_id)
    default = QueryEncoder.for_model(served, tokenizer)  # the Router's default settings
    encoder, router = default, routers[f"router ({default.pooling}, {default.max_length} tokens)"]

    def per_record(adapter: str | None, records) -> np.ndarray:
        """``[n]`` scores with ``adapter`` (None = the base): correct (0/1) for multiple choice, else
        minus the answer's NLL per token."""
        if adapter in full:
            scored = load_for_eval(paths[adapter], zoo.base)[0]
            return example_scores(scored, tokenizer, records, max_length=256).main
        if adapter is None:
            with served.disable_adapter():
                return example_scores(served, tokenizer, records, max_length=256).main
        served.set_adapter(adapter)
        return example_scores(served, tokenizer, records, max_length=256).main

    free = routers.get(f"data-free (LODO, {map_label(args.map_alpha, args.shrinkage)})")
    methods = ("base", "random", "router", "data-free", "arrow", "oracle")
    print(f"\nmean per record, 95% interval (n={args.downstream} per domain; acc, or -NLL/token: math, code)")
    print("\n| domain | " + " | ".join(methods) + " |")
    print("|---|" + "---|" * len(methods))
    clock = time.perf_counter()
    for domain in zoo.spec.domains:
        records = tests[domain][: args.downstream]
        with served.disable_adapter():
            encoded = encoder([query_text(r) for r in records])
        picks = {
            "base": [None] * len(records),
            "random": [rng.choice(ids) for _ in records],
            "router": [d.adapters[0] for d in router.decide(encoded)],
            "oracle": [f"{domain}-0"] * len(records),
        }
        if free is not None:  # its map never saw this domain (leave one domain out)
            picks["data-free"] = [d.adapters[0] for d in free.decide(encoded)]
        values: dict[str, np.ndarray] = {}
        for method, adapters in picks.items():
            values[method] = np.empty(len(records))
            for adapter in set(adapters):
                rows = [i for i, a in enumerate(adapters) if a == adapter]
                values[method][rows] = per_record(adapter, [records[i] for i in rows])
        if arrow is not None:
            values["arrow"] = example_scores(arrow, tokenizer, records, max_length=256).main
        cells = []
        for method in methods:
            if method not in values:
                cells.append("-")
                continue
            interval = Interval.of(values[method])
            cells.append(f"{interval.mean:.3f} [{interval.low:.3f}, {interval.high:.3f}]")
        print(f"| {domain} | " + " | ".join(cells) + " |", flush=True)
    print(f"\ndownstream scoring: {time.perf_counter() - clock:.0f}s")


if __name__ == "__main__":
    main()
