"""Selection vs random on the tiny zoo: statistics, caching, report files, the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from scipy import stats

from delta_router.experiments.compare import (
    CompareConfig,
    Row,
    SelectionComparison,
    difference_ci,
    gain_table,
    mean_ci,
    summarize,
    write_report,
)
from delta_router.home import cache_dir
from delta_router.merging.merger import PROVENANCE_FILE
from delta_router.testing import SYNTHETIC_WORDS, synthetic_domain
from delta_router.training.trainer import TrainConfig
from delta_router.zoo.zoo import Zoo, ZooSpec

TINY_TRAIN = TrainConfig(max_steps=5, batch_size=8, learning_rate=1e-2)


def test_mean_ci_on_fixed_numbers():
    mean, half = mean_ci([0.5, 0.7, 0.6, 0.8])
    # sd = 0.129099, sem = 0.0645497, t(0.975, df=3) = 3.182446 (table value)
    assert mean == pytest.approx(0.65) and half == pytest.approx(3.182446 * 0.0645497, rel=1e-5)
    assert mean_ci([0.4, 0.4, 0.4]) == (pytest.approx(0.4), pytest.approx(0.0, abs=1e-12))
    single = mean_ci([0.3])
    assert single[0] == 0.3 and math.isnan(single[1])


def test_summary_reports_gain_over_random():
    rows = [Row("d", "selected", 3, "ties", None, ["a"], 0.9)]
    rows += [Row("d", "random", 3, "ties", s, ["b"], v) for s, v in enumerate([0.5, 0.6, 0.7])]
    [selected, random_] = summarize(rows)
    assert selected["gain_vs_random"] == pytest.approx(0.3) and random_["n"] == 3
    assert selected["gain_ci95"] == pytest.approx(mean_ci([0.4, 0.3, 0.2])[1])


def test_gain_table_marks_domains_that_clear_the_target():
    def rows(domain: str, selected: float, randoms: list[float], metrics_key: str = "acc") -> list[Row]:
        out = [Row(domain, "selected", 3, "ties", None, ["a"], selected, {metrics_key: 1.0})]
        return out + [Row(domain, "random", 3, "ties", s, ["b"], v, {metrics_key: 1.0})
                      for s, v in enumerate(randoms)]  # fmt: skip

    table = gain_table(summarize(
        rows("clear", 0.9, [0.5, 0.55, 0.6]) + rows("small", 0.62, [0.6, 0.6, 0.61])
        + rows("noisy", 0.7, [0.2, 0.9, 0.5]) + rows("code", -10.0, [-12.0, -13.0, -12.5], "loglik")
    ))  # fmt: skip
    lines = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert "**+35.0" in lines["clear"] and "**" not in lines["small"] and "**" not in lines["noisy"]
    assert "nats" in lines["code"] and "**+2.5" in lines["code"]
    assert lines["**>= 5 points, CI > 0**"].endswith("| 1/3 |")  # log-likelihood domains are not counted


def test_difference_ci_is_welch():
    a, b = [0.8, 0.9, 1.0], [0.5, 0.6, 0.7, 0.8]
    diff, half = difference_ci(a, b)
    va, vb = 0.01 / 3, (0.0166667) / 4  # sample variances / n
    dof = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    assert diff == pytest.approx(0.25)
    assert half == pytest.approx(stats.t.ppf(0.975, dof) * math.sqrt(va + vb), rel=1e-4)
    # One value on the left is exact: the interval is the one-sample interval of the right.
    assert difference_ci([0.9], b)[1] == pytest.approx(mean_ci(b)[1])


def test_lorahub_rows_get_seeded_selected_and_random_draws():
    draws = {"selected": [0.8, 0.9], "random": [0.5, 0.6]}
    rows = [Row("d", c, 2, "lorahub", s, ["a", "b"], v, weights=[0.5, 0.1])
            for c, values in draws.items() for s, v in enumerate(values)]  # fmt: skip
    [selected, _] = summarize(rows)
    assert selected["n"] == 2 and selected["gain_vs_random"] == pytest.approx(0.3)


@pytest.fixture(scope="module")
def tiny_zoo(tiny_base, tmp_path_factory):
    spec = ZooSpec("tiny", tuple(SYNTHETIC_WORDS), parts=2, train_size=24, train=TINY_TRAIN)
    splits = {name: synthetic_domain(name) for name in SYNTHETIC_WORDS}
    zoo = Zoo(spec, tiny_base, root=tmp_path_factory.mktemp("zoo"), progress=False, splits=splits)
    zoo.build()
    return zoo


def test_comparison_runs_every_condition_and_caches(tiny_zoo, tmp_path):
    config = CompareConfig(
        ks=(1, 2), recipes=("linear",), seeds=2, examples=10, eval_size=12, method="activations",
        hub_size=2, hub_examples=4, hub_budget=4,
    )  # fmt: skip
    comparison = SelectionComparison(tiny_zoo, config, progress=False)
    rows = comparison.run(["fruit"])
    conditions = {(r.condition, r.k, r.recipe) for r in rows}
    merges = {(c, k, "linear" if k > 1 else "-") for c in ("selected", "in-domain", "random") for k in (1, 2)}
    hubs = {("selected", 2, "lorahub"), ("random", 2, "lorahub")}
    assert conditions == {("base", 0, "-"), ("all", 4, "linear")} | merges | hubs
    hub = [r for r in rows if r.recipe == "lorahub"]
    assert len(hub) == 4 and all(len(r.weights) == 2 for r in hub)
    top = next(r for r in rows if r.condition == "selected" and r.k == 1).models[0]
    assert all(r.models[0] == top for r in hub if r.condition == "selected")
    assert all(0.0 <= r.score <= 1.0 for r in rows)
    assert all(m.startswith("fruit") for r in rows if r.condition == "in-domain" for m in r.models)
    cached = sorted(comparison.cache.iterdir())
    assert [r.score for r in comparison.run(["fruit"])] == [r.score for r in rows]  # from the cache
    assert sorted(comparison.cache.iterdir()) == cached
    held_out = synthetic_domain("fruit", seed=7)  # a user's task: their examples, their held-out set
    task_rows = comparison.run_task("my-fruit", held_out.fewshot, held_out.test)
    assert {r.condition for r in task_rows} == {"base", "all", "selected", "random"}  # no in-domain models
    assert all(r.domain == "my-fruit" for r in task_rows)

    def random_draws(rows: list[Row]) -> list[tuple]:
        return sorted(
            (r.k, r.seed, r.models) for r in rows if r.condition == "random" and r.recipe != "lorahub"
        )

    assert random_draws(task_rows) == random_draws(rows)  # one random pool per (k, seed), every task
    merges = [p for p in cache_dir("evals", "merges").iterdir() if (p / PROVENANCE_FILE).exists()]
    all_models = [p for p in merges if len(json.loads((p / PROVENANCE_FILE).read_text())["models"]) == 4]
    assert len(all_models) == 1  # one merge of every finetune, scored on both tasks
    before = set(comparison.cache.iterdir())
    again = comparison.run_task("my-fruit", held_out.fewshot[1:], held_out.test)  # other examples
    refit = [json.loads(p.read_text())["models"] for p in set(comparison.cache.iterdir()) - before]
    # the same random pools, but LoraHub's weights are learnt on the examples: fitted anew
    assert all(r.models in refit for r in again if r.recipe == "lorahub" and r.condition == "random")
    out = write_report(rows, tmp_path / "report", "delta-router compare ...")
    assert {p.name for p in out.iterdir()} == {"compare.md", "compare.json", "compare.png", "gains.png"}
    assert len(json.loads((out / "compare.json").read_text())["rows"]) == len(rows)
    # free-form domains only (scored by answer log-likelihood): no accuracy bar chart, no crash
    loglik = [replace(r, metrics={"loglik": -7.0}) for r in rows]
    out = write_report(loglik, tmp_path / "loglik", "delta-router compare ...")
    assert {p.name for p in out.iterdir()} == {"compare.md", "compare.json", "gains.png"}
    assert "compare.png" not in (out / "compare.md").read_text()


def test_every_ablation_runs_on_a_tiny_zoo(tiny_base, tmp_path):
    from delta_router.experiments.ablations import ABLATIONS, Ablations

    spec = ZooSpec("tiny-ablate", tuple(SYNTHETIC_WORDS), parts=2, mixtures=(("fruit", "digits"),),
                   robustness_domains=("fruit",), train_size=24, train=TINY_TRAIN)  # fmt: skip
    splits = {name: synthetic_domain(name) for name in SYNTHETIC_WORDS}
    zoo = Zoo(spec, tiny_base, root=tmp_path / "zoo", progress=False, splits=splits)
    zoo.build()
    results = Ablations(zoo, tmp_path / "reports", fewshot_sizes=(5, 10)).run()
    assert set(results) == set(ABLATIONS)
    baselines = {"Delta Activations", "flattened LoRA weights", "salient mask (top 1%)", "output embeddings"}
    assert set(results["clustering"]["silhouette"]) == baselines
    assert all(-1 <= v <= 1 for v in results["probes"]["silhouette"].values())
    assert len(results["robustness"]["variants"]) == 5
    mix = results["additivity"]["mixtures"]["mix-fruit+digits"]
    assert -1 <= mix["cos(mix, A+B)"] <= 1
    assert results["fewshot"]["accuracy"]["activations"]["5"]["queries"] == 2
    formats = results["task_format"]["retrieval"]
    assert {"as given", "letter answers", "no options", "as given, centred"} <= set(formats)
    by_queries = [formats[f"{v}, by queries"] for v in ("as given", "letter answers", "no options")]
    assert by_queries[0] == by_queries[1]  # what the examples ask, not how they answer
    assert all(0 <= row["top1"] <= row["top3"] <= 1 and row["tasks"] == 2 for row in formats.values())
    for name in ABLATIONS:
        assert (tmp_path / "reports" / f"{name}.md").exists()
    assert (tmp_path / "reports" / "fewshot.png").exists()


def test_ablations_on_a_wild_zoo_compare_mixed_finetunes_and_recipe_factors(tiny_base, tmp_path):
    from delta_router.experiments.ablations import Ablations
    from delta_router.testing import tiny_wild_zoo

    zoo = tiny_wild_zoo(tiny_base, tmp_path / "zoo")
    zoo.build()
    ablations = Ablations(zoo, tmp_path / "reports", fewshot_sizes=(5,), fewshot_formats=("chat", "qa"),
                          fewshot_methods=("activations",))  # fmt: skip
    results = ablations.run(["clustering", "nuisance", "fewshot", "probes"])
    assert set(results["probes"]["silhouette by format"]) == set(results["probes"]["silhouette"])
    scores = results["clustering"]["silhouette"]  # LoRA ranks and a full finetune: sampled weight deltas
    assert "flattened weight deltas (sampled)" in scores and all(-1 <= v <= 1 for v in scores.values())
    grouping = results["nuisance"]["grouping"]
    assert {"domain", "format", "method", "seed"} <= set(grouping)
    assert "note" in grouping["seed"]  # every member draws its own seed: nothing to group
    for row in grouping.values():
        assert "note" in row or (-1 <= row["silhouette"] <= 1 and 0 <= row["chance"] <= 1)
    accuracy = results["fewshot"]["accuracy"]
    assert set(accuracy) == {"activations, chat format", "activations, qa format"}
    assert all(per_size["5"]["queries"] == 2 for per_size in accuracy.values())
    from delta_router.experiments.summary import write_summary

    readme = write_summary(tmp_path / "reports", tmp_path / "missing", ("wild-tiny", "full")).read_text()
    assert "| silhouette by domain: Delta Activations |" in readme and "| 0.614 |" in readme
    assert "few-shot top-1 domain, activations, chat format, 5 examples" in readme
    assert "| silhouette by format, probes: 5 probes (paper) |" in readme


def test_summary_reads_the_routing_benchmark(tmp_path):
    """route_accuracy's JSON: accuracies, each view's silhouettes and the abstention trades become rows
    (a curve with no trade within budget says so)."""
    import json

    from delta_router.experiments.summary import headline_figures

    best = {"threshold": 0.4, "to_base": 0.7, "lost": 2.8, "to_base by withheld domain": {"math": 1.0}}
    (tmp_path / "routing.json").write_text(json.dumps({
        "accuracy": {"router": 0.9},
        "silhouette": {"data-based profiles": {"domain": 0.6, "format": -0.1}},
        "abstention": {"router": {"rows": [], "best within 5 points": best}, "free": {"rows": []}},
    }))  # fmt: skip
    rows = headline_figures(tmp_path)
    assert rows["router accuracy: router"] == "90.0%"
    assert rows["silhouette by domain, view: data-based profiles"] == "0.600"
    assert rows["silhouette by format, view: data-based profiles"] == "-0.100"
    assert rows["withheld domain to the base, most within 5 points: router"] == "70% for 2.8 points"
    assert rows["withheld domain to the base, most within 5 points: free"] == "none within 5 points"


def test_summary_puts_each_zoo_mapped_by_the_other_on_one_row(tmp_path):
    """wild's "map on full" and full's "map on wild" are one row of the table."""
    import json

    from delta_router.experiments.summary import write_summary

    for zoo, other in (("wild", "full"), ("full", "wild")):
        (tmp_path / zoo).mkdir()
        accuracy = {f"data-free (map on {other})": 0.8, f"data-free (map on {other} + {zoo}, LODO)": 0.9}
        (tmp_path / zoo / "routing.json").write_text(json.dumps({"accuracy": accuracy}))
    readme = write_summary(tmp_path / "wild", tmp_path / "full", ("wild", "full")).read_text()
    assert "| router accuracy: data-free (map on the other zoo) | 80.0% | 80.0% | - |" in readme
    union = "data-free (map on the other zoo + this zoo, LODO)"
    assert f"| router accuracy: {union} | 90.0% | 90.0% | - |" in readme


def test_comparison_merges_a_full_finetune_with_loras(tiny_base, tmp_path):
    """A wild zoo holds full finetunes: a merge with one is a full model, not a refusal."""
    from delta_router.testing import tiny_wild_zoo

    zoo = tiny_wild_zoo(tiny_base, tmp_path / "zoo")
    zoo.build()
    config = CompareConfig(ks=(2,), recipes=("linear",), seeds=1, examples=5, eval_size=8,
                           method="activations", hub_size=0)  # fmt: skip
    comparison = SelectionComparison(zoo, config, progress=False)
    rows = comparison.run(["fruit"])
    every = next(r for r in rows if r.condition == "all")
    kinds = {comparison.index.get(m).embedding.kind for m in every.models}
    assert kinds == {"lora", "full"} and 0.0 <= every.score <= 1.0


def test_comparison_selects_by_queries_with_a_router(tiny_zoo, tmp_path, capsys):
    from delta_router.cli import main
    from delta_router.routing.router import QueryEncoder, Router

    encoder = QueryEncoder.for_model(tiny_zoo.base.load_model(), tiny_zoo.base.load_tokenizer())
    router = Router.fit_zoo(tiny_zoo, encoder)
    config = CompareConfig(ks=(1,), recipes=("linear",), seeds=1, examples=10, eval_size=8, method="queries",
                           hub_size=0)  # fmt: skip
    comparison = SelectionComparison(tiny_zoo, config, progress=False, router=router)
    rows = comparison.run(["fruit"])
    [selected] = [r for r in rows if r.condition == "selected"]
    examples = [r.instruction + "\n\n" + r.input for r in tiny_zoo.splits("fruit").fewshot[:10]]
    routed = [d.adapters[0] for d in router.route(encoder, examples)]
    assert selected.models == [max(set(routed), key=routed.count)]  # where the router sends the examples
    assert selected.models[0].startswith("fruit")
    # the CLI checks the pairing before any work: --method queries needs --router, and only it takes one
    router.save(tmp_path / "router")
    assert main(["compare", "--method", "queries", "--out", str(tmp_path / "a")]) == 2
    assert "needs --router" in capsys.readouterr().err
    assert main(["compare", "--router", str(tmp_path / "router"), "--out", str(tmp_path / "b")]) == 2
    assert "--method queries" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
