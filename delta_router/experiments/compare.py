"""Selection vs random: does merging the Delta-Activations top-k beat merging k random finetunes?

For each target domain, 20 examples of its few-shot pool select the top-k of the zoo's
single-domain finetunes (``TaskSelector``); every condition is merged into one LoRA adapter
(``Merger.merge_adapters``; into a full model with ``Merger.merge`` where no adapter holds it: a
full finetune or DoRA among them, as in the ``wild`` zoo) and scored with lm-eval on the domain's
held-out split:

- ``base``: the base model;
- ``selected``: the top-k merge (``k=1``: the best single candidate itself);
- ``random``: merges of k uniformly random candidates, one per seed (``seeds`` of them); the same
  draws for every target, so each random merge is built once and scored on every domain;
- ``in-domain``: the merge of k finetunes of the target domain (the oracle selection);
- ``all``: the merge of every candidate.

and the paper's own protocol (recipe ``lorahub``, per seed): a ``LoraHub`` combination of the
top-1 plus ``hub_size - 1`` random candidates (``selected``) vs of ``hub_size`` random ones
(``random``), its weights learnt on ``hub_examples`` of the 20 examples.

Scores are cached per condition (``$DELTA_ROUTER_HOME/evals/compare/``), so a rerun only does
what is missing. ``summarize`` gives mean and 95% CI (Student t over seeds) per condition.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from delta_router.data import Record
from delta_router.evaluation.clustering import save_figure
from delta_router.evaluation.harness import LmEvaluator, load_for_eval, task_name, write_tasks
from delta_router.home import atomic_write_text, cache_dir
from delta_router.merging.lorahub import LoraHub
from delta_router.merging.merger import PROVENANCE_FILE, Merger, MergeRecipe, adapter_merge_refusal
from delta_router.model_ids import BASE_MODEL_NAME
from delta_router.models.finetunes import Finetune
from delta_router.routing.router import Router
from delta_router.search.selector import TaskSelector
from delta_router.serialize import to_json
from delta_router.training.trainer import records_hash

logger = logging.getLogger(__name__)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of its Student-t confidence interval (``nan`` for one value)."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan")
    sem = float(values.std(ddof=1) / np.sqrt(len(values)))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * sem)


def difference_ci(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """mean(a) - mean(b) and the half-width of its confidence interval (scipy): Welch's t-interval,
    or, where one side is a single value (one selected merge), that value counts as exact and the
    interval is the other side's one-sample t-interval. Zero spread on both sides: 0.0."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean())
    if len(a) + len(b) <= 2:
        return diff, float("nan")
    if max(a.var(), b.var()) == 0:
        return diff, 0.0
    if len(a) > 1 and len(b) > 1:
        result = stats.ttest_ind(a, b, equal_var=False)
    else:
        one, many = (a, b) if len(a) == 1 else (b, a)
        result = stats.ttest_1samp(many, one[0])
    low, high = result.confidence_interval(confidence)
    return diff, float(high - low) / 2


TARGET_GAIN = 0.05  # the bar: selection >= 5 accuracy points above random


def headline_metric(metrics: dict[str, float]) -> str:
    """Which number ``headline`` reports: ``acc``, ``exact_match`` or ``loglik``."""
    return next((key for key in ("acc", "exact_match") if key in metrics), "loglik")


def headline(metrics: dict[str, float]) -> float:
    """One number per task, higher is better: accuracy, exact match, or the mean log-likelihood of a
    whole reference answer (nats per document)."""
    return metrics[headline_metric(metrics)]


@dataclass(frozen=True)
class CompareConfig:
    ks: tuple[int, ...] = (1, 3, 5)
    recipes: tuple[str, ...] = ("linear", "ties")
    seeds: int = 5
    examples: int = 20
    eval_size: int = 300  # held-out records per domain
    limit: int | None = None  # lm-eval documents per task
    method: str = "finetune"  # selection method
    hub_size: int = 5  # adapters per LoraHub combination (0: skip the protocol)
    hub_examples: int = 5  # examples the LoraHub weights are learnt on (LoraHub's default)
    hub_budget: int = 40  # loss evaluations of the LoraHub weight search


@dataclass
class Row:
    domain: str
    condition: str  # base | selected | random | in-domain | all
    k: int
    recipe: str
    seed: int | None
    models: list[str]
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    weights: list[float] | None = None  # learnt LoraHub weights, in ``models`` order

    @classmethod
    def of(
        cls, domain: str, condition: str, k: int, recipe: str, seed: int | None, models, result: dict
    ) -> Row:
        """A row from a cached ``_score`` result."""
        metrics = result["metrics"]
        return cls(
            domain,
            condition,
            k,
            recipe,
            seed,
            list(models),
            headline(metrics),
            metrics,
            result.get("weights"),
        )


# work directory -> (model to evaluate: BASE_MODEL_NAME or a directory, extra fields for the cache entry)
Builder = Callable[[Path], tuple[str | Path, dict]]


class SelectionComparison:
    """Runs the comparison on a zoo: ``SelectionComparison(zoo, config).run(domains)`` -> rows."""

    def __init__(
        self,
        zoo,
        config: CompareConfig = CompareConfig(),
        progress: bool = True,
        router: Router | None = None,
    ):
        """``router``: the profiles ``config.method == "queries"`` ranks by (``TaskSelector``)."""
        self.zoo, self.config, self.progress, self.router = zoo, config, progress, router
        self.index = zoo.load_index().filtered(lambda e: e.tags.get("kind") == "domain")
        self.domain_of = {e.model_id: e.tags["domain"] for e in self.index.list()}
        self.cache = cache_dir("evals", "compare", zoo.root.name)

    def run(self, domains: Sequence[str]) -> list[Row]:
        rows = []
        for domain in domains:
            rows += self.run_domain(domain)
        return rows

    def run_domain(self, domain: str) -> list[Row]:
        """The comparison on a zoo domain: its few-shot pool selects, its test split scores."""
        splits = self.zoo.splits(domain)
        return self.run_task(domain, splits.fewshot, splits.test)

    def run_task(self, name: str, examples: Sequence[Record], held_out: Sequence[Record]) -> list[Row]:
        """The comparison on any task: ``examples`` select (the first ``config.examples``), ``held_out``
        score (the first ``config.eval_size``). ``in-domain`` rows need zoo members tagged ``name``."""
        config = self.config
        examples = list(examples[: config.examples])
        evaluator = LmEvaluator(write_tasks({name: held_out[: config.eval_size]}), limit=config.limit)
        task = task_name(name)
        selector = TaskSelector(self.index, method=config.method, progress=self.progress, router=self.router)
        ranked = selector.select(examples, k=len(self.index)).model_ids
        candidates = sorted(self.domain_of)
        in_domain = [m for m in candidates if self.domain_of[m] == name]
        combination = {recipe: MergeRecipe.load(recipe).adapter_combination for recipe in config.recipes}

        def score(condition: str, models: list[str], k: int, recipe: str, seed: int | None = None) -> Row:
            # The recipe and how PEFT merges with it name a merge; one model or none has no recipe.
            key = [sorted(models), recipe, combination[recipe]] if len(models) > 1 else [sorted(models), "-"]
            result = self._score(evaluator, task, key, self._merge_builder(models, recipe))
            return Row.of(name, condition, k, recipe, seed, models, result)

        rows = [score("base", [], 0, "-")]
        for recipe in config.recipes:
            rows.append(score("all", candidates, len(candidates), recipe))
            for k in config.ks:
                if k == 1 and recipe != config.recipes[0]:
                    continue  # one model: nothing to merge, the recipe does not matter
                setting = recipe if k > 1 else "-"
                rows.append(score("selected", ranked[:k], k, setting))
                if in_domain:  # the target's own finetunes (all of them, if fewer than k)
                    rows.append(score("in-domain", in_domain[:k], k, setting))
                for seed in range(config.seeds):
                    picks = random.Random(f"random-{k}-{seed}").sample(candidates, k)
                    rows.append(score("random", picks, k, setting, seed))
        if config.hub_size:
            rows += self._lorahub_rows(
                name, evaluator, examples[: config.hub_examples], ranked[0], candidates
            )
        return rows

    def _lorahub_rows(
        self, name: str, evaluator: LmEvaluator, examples: list[Record], top: str, candidates: list[str]
    ) -> list[Row]:
        """The paper's protocol: LoraHub over top-1 + (n-1) random vs over n random, per seed."""
        config, task = self.config, task_name(name)
        n = min(config.hub_size, len(candidates))
        # the search fits its weights on ``examples``: they are part of what the model is
        search = {"budget": config.hub_budget, "examples_sha256": records_hash(examples)}
        rows = []
        for seed in range(config.seeds):
            rng = random.Random(f"{name}-lorahub-{seed}")
            draws = {"selected": [top, *rng.sample([m for m in candidates if m != top], n - 1)],
                     "random": rng.sample(candidates, n)}  # fmt: skip
            for condition, models in draws.items():
                build = self._hub_builder(models, examples)
                result = self._score(evaluator, task, [models, "lorahub", search], build)
                rows.append(Row.of(name, condition, n, "lorahub", seed, models, result))
        return rows

    def _paths(self, models: Sequence[str]) -> list[Path]:
        return [self.index.get(m).embedding.path for m in models]

    def _merge_builder(self, models: list[str], recipe: str) -> Builder:
        def build(work_dir: Path) -> tuple[str | Path, dict]:
            paths = self._paths(models)
            if len(paths) <= 1:
                return (paths[0] if paths else BASE_MODEL_NAME), {}
            if not work_dir.exists():
                merger = Merger(self.zoo.base, recipe, progress=False)
                finetunes = [Finetune.open(p) for p in paths]
                if adapter_merge_refusal(finetunes) is None:
                    merger.merge_adapters(finetunes, work_dir)
                else:  # a full finetune or DoRA among them: only a full model holds the merge
                    merger.merge(finetunes, work_dir)
            return work_dir, {}

        return build

    def _hub_builder(self, models: list[str], examples: Sequence[Record]) -> Builder:
        def build(work_dir: Path) -> tuple[Path, dict]:
            if not work_dir.exists():
                hub = LoraHub(
                    self.zoo.base, self._paths(models), self.config.hub_budget, progress=self.progress
                )
                hub.fit(examples).save(work_dir)
            record = json.loads((work_dir / PROVENANCE_FILE).read_text())
            return work_dir, {"weights": [m["weight"] for m in record["models"]]}

        return build

    def _score(self, evaluator: LmEvaluator, task: str, key: list, build: Builder) -> dict:
        """``{"metrics", "weights", ...}`` of the model ``build(work_dir)`` makes, cached by ``key``.

        ``key`` names the model (``[sorted models, recipe, combination]`` for merges, or the LoraHub
        setup): the built model is cached by it (shared by every task), its scores by it and the eval
        setup (tasks, limit).
        """
        path = self.cache / f"{_digest([*key, str(evaluator.tasks_dir), evaluator.limit])}.json"
        if path.exists():
            return json.loads(path.read_text())
        target, extra = build(cache_dir("evals", "merges") / _digest(key))
        model, tokenizer = load_for_eval(target, self.zoo.base)
        metrics = evaluator.evaluate(model, tokenizer, [task])[task]
        result = {"models": key[0], "recipe": key[1], "metrics": metrics, **extra}
        atomic_write_text(path, json.dumps(result))
        logger.info("%s %s %s: %s", task, key[1], key[0], metrics)
        return result


def _digest(value) -> str:
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:20]


def summarize(rows: Sequence[Row]) -> list[dict]:
    """Mean and 95% CI of the score per (domain, condition, k, recipe), plus selected − random and
    in-domain − random (Welch intervals)."""
    groups: dict[tuple, list[float]] = {}
    metric = {row.domain: headline_metric(row.metrics) for row in rows}
    for row in rows:
        groups.setdefault((row.domain, row.condition, row.k, row.recipe), []).append(row.score)
    table = []
    for (domain, condition, k, recipe), scores in groups.items():
        mean, ci = mean_ci(scores)
        entry = {"domain": domain, "metric": metric[domain], "condition": condition, "k": k, "recipe": recipe,
                 "n": len(scores), "mean": mean, "ci95": ci}  # fmt: skip
        if condition in ("selected", "in-domain"):  # in-domain - random: the headroom of any selector
            random_scores = groups.get((domain, "random", k, recipe), [])
            if random_scores:
                gain, gain_ci = difference_ci(scores, random_scores)
                entry |= {"gain_vs_random": gain, "gain_ci95": gain_ci}
        table.append(entry)
    return table


def to_markdown(summary: Sequence[dict]) -> str:
    lines = ["| domain | condition | k | recipe | n | score (mean ± 95% CI) | − random |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for e in summary:
        ci = "" if np.isnan(e["ci95"]) else f" ± {e['ci95']:.3f}"
        gain = ""
        if "gain_vs_random" in e:
            gain_ci = "" if np.isnan(e["gain_ci95"]) else f" ± {e['gain_ci95']:.3f}"
            gain = f"{e['gain_vs_random']:+.3f}{gain_ci}"
        lines.append(f"| {e['domain']} | {e['condition']} | {e['k']} | {e['recipe']} | {e['n']} "
                     f"| {e['mean']:.3f}{ci} | {gain} |")  # fmt: skip
    return "\n".join(lines)


def _gains(summary: Sequence[dict]) -> tuple[list[tuple[int, str]], dict[tuple, dict]]:
    """The (k, recipe) settings with a selected-vs-random gain, and each (domain, k, recipe)'s entry."""
    entries = {
        (e["domain"], e["k"], e["recipe"]): e
        for e in summary
        if e["condition"] == "selected" and "gain_vs_random" in e
    }
    settings = sorted({(k, recipe) for _, k, recipe in entries}, key=lambda s: (s[1] == "lorahub", s))
    return settings, entries


def _setting(k: int, recipe: str) -> str:
    return f"k={k}" if recipe == "-" else f"k={k} {recipe}"


def gain_table(summary: Sequence[dict]) -> str:
    """Selected − random per domain (rows) and setting (columns), accuracy in points, log-likelihood in nats.

    Bold: accuracy gain >= ``TARGET_GAIN`` with the interval above zero (log-likelihood: above zero).
    The last row counts the bold accuracy domains per setting.
    """
    settings, entries = _gains(summary)
    domains = list(dict.fromkeys(domain for domain, _, _ in entries))
    lines = ["| domain | unit | " + " | ".join(_setting(*s) for s in settings) + " |",
             "|---|---|" + "---|" * len(settings)]  # fmt: skip
    wins = dict.fromkeys(settings, 0)
    counted = dict.fromkeys(settings, 0)
    for domain in domains:
        accuracy = next(e["metric"] != "loglik" for (d, _, _), e in entries.items() if d == domain)
        scale = 100.0 if accuracy else 1.0
        cells = []
        for setting in settings:
            e = entries.get((domain, *setting))
            if e is None:
                cells.append("")
                continue
            gain, ci = e["gain_vs_random"], 0.0 if np.isnan(e["gain_ci95"]) else e["gain_ci95"]
            win = gain - ci > 0 and (gain >= TARGET_GAIN or not accuracy)
            if accuracy:
                counted[setting] += 1
                wins[setting] += win
            text = f"{scale * gain:+.1f} ± {scale * ci:.1f}"
            cells.append(f"**{text}**" if win else text)
        lines.append(f"| {domain} | {'acc points' if accuracy else 'nats'} | " + " | ".join(cells) + " |")
    lines.append(
        "| **>= 5 points, CI > 0** | | " + " | ".join(f"{wins[s]}/{counted[s]}" for s in settings) + " |"
    )
    return "\n".join(lines)


def gain_chart(summary: Sequence[dict], path: Path) -> Path:
    """Selected − random (± 95% CI) per domain, one bar per setting; a panel per unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings, entries = _gains(summary)
    panels = {}
    for (domain, k, recipe), e in entries.items():
        unit = "accuracy points" if e["metric"] != "loglik" else "answer log-likelihood (nats)"
        panels.setdefault(unit, {}).setdefault(domain, {})[(k, recipe)] = e
    fig, axes = plt.subplots(1, len(panels), figsize=(2 + 5 * len(panels), 4), squeeze=False,
                             width_ratios=[len(d) for d in panels.values()])  # fmt: skip
    width = 0.8 / len(settings)
    for ax, (unit, by_domain) in zip(axes[0], panels.items(), strict=True):
        scale = 100.0 if unit.startswith("accuracy") else 1.0
        domains = list(by_domain)
        for j, setting in enumerate(settings):
            found = [by_domain[d].get(setting) for d in domains]
            gains = [scale * e["gain_vs_random"] if e else np.nan for e in found]
            cis = [scale * e["gain_ci95"] if e and not np.isnan(e["gain_ci95"]) else 0.0 for e in found]
            ax.bar(
                np.arange(len(domains)) + j * width,
                gains,
                width,
                yerr=cis,
                capsize=2,
                label=_setting(*setting),
            )
        if scale == 100.0:
            ax.axhline(100 * TARGET_GAIN, color="grey", linestyle="--", linewidth=1, label="target (+5)")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
        ax.set_ylabel(f"selected − random, {unit}")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Delta-Activations selection minus random selection (95% CI over random seeds)")
    return save_figure(fig, path)


def bar_chart(summary: Sequence[dict], path: Path) -> Path | None:
    """Accuracy per domain: base, selected, random (± CI), in-domain, all, for the largest k merged.
    None (no file) when no domain is scored by accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [e for e in summary if e["metric"] != "loglik"]  # one axis: accuracies only
    if not any(e["condition"] == "selected" for e in summary):
        return None
    domains = list(dict.fromkeys(e["domain"] for e in summary))
    k = max(e["k"] for e in summary if e["condition"] == "selected")
    recipe = next(e["recipe"] for e in summary if e["condition"] == "selected" and e["k"] == k)
    conditions = ["base", "selected", "random", "in-domain", "all"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(domains), 4))
    width = 0.8 / len(conditions)

    def shown(e: dict, condition: str) -> bool:
        if e["condition"] != condition:
            return False
        return condition == "base" or (e["recipe"] == recipe and (condition == "all" or e["k"] == k))

    for j, condition in enumerate(conditions):
        means, cis = [], []
        for domain in domains:
            match = [e for e in summary if e["domain"] == domain and shown(e, condition)]
            means.append(match[0]["mean"] if match else np.nan)
            cis.append(0.0 if not match or np.isnan(match[0]["ci95"]) else match[0]["ci95"])
        ax.bar(np.arange(len(domains)) + j * width, means, width, yerr=cis, label=condition, capsize=2)
    ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
    ax.set_ylabel("held-out score")
    ax.set_title(f"merge of k={k} ({recipe}): Delta-Activations selection vs random")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def write_report(rows: Sequence[Row], out_dir: str | Path, command: str) -> Path:
    """``compare.md`` (tables + command), ``compare.json`` (raw scores), ``compare.png``, ``gains.png``."""
    out_dir = Path(out_dir)
    summary = summarize(rows)
    atomic_write_text(out_dir / "compare.json", json.dumps({"rows": to_json(list(rows)),
                                                            "summary": summary}, indent=2))  # fmt: skip
    bars = bar_chart(summary, out_dir / "compare.png")
    gain_chart(summary, out_dir / "gains.png")
    text = "\n\n".join([
        "# Selection vs random merges", f"`{command}`",
        "## Selected − random", gain_table(summary), "![gains](gains.png)",
        "## Every condition", to_markdown(summary), "![bars](compare.png)\n" if bars else "",
    ])  # fmt: skip
    atomic_write_text(out_dir / "compare.md", text)
    return out_dir
