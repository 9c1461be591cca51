"""The unseen-task suite: does ``build`` help on tasks whose datasets no finetune of the index saw?

Each task of a suite of ``data.sources.UNSEEN_SUITES``: "unseen" (BoolQ, SciQ, MedQA, BioASQ, MMLU
psychology) or "unseen-dev" (PIQA, Social IQa, Qasper, MMLU biology and nutrition: for choosing
settings such as ``build``'s decision rule without the suite's results; no zoo reads either) gets
a seeded split of ``examples`` records (what a user hands over) and ``held_out`` records (>= 200:
the verdict of 40 flips with the seed). ``build``'s selection and verification run on the examples
exactly as ``delta-router build`` does; then, on the held-out records, every model is patched into
one loaded base and scored:

- the base; the model ``build`` returns; the selected top-k linear merge (what the unverified
  ``build`` would return); k random finetunes merged the same way, over ``seeds`` seeds; the
  20-example LoRA alone;
- the oracle: the best single finetune of the index on the held-out records. Every finetune is
  screened on the first ``screen`` held-out records and the best ``finalists`` are scored on all
  of them (scoring 21 finetunes on 200 long records is most of an hour on 2 cores).

Per-model scores are cached under ``$DELTA_ROUTER_HOME/unseen`` (per task, model content and
records), so an interrupted run resumes. ``write_report`` writes ``results.json``, ``README.md``
(tables with 95% intervals) and ``unseen.png``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delta_router.data import Record, load_domain
from delta_router.data.sources import UNSEEN_SUITES, UNSEEN_TASKS
from delta_router.evaluation.clustering import save_figure
from delta_router.evaluation.scoring import SCORE_FIELDS, ExampleScores, example_scores
from delta_router.evaluation.verification import Gain, Interval
from delta_router.home import atomic_write_text, cache_dir
from delta_router.merging.build import TaskVerifier, candidate_grid, prior_candidate
from delta_router.merging.candidates import Candidate
from delta_router.model_ids import BASE_MODEL_NAME
from delta_router.models.finetunes import Finetune
from delta_router.search.index import ModelIndex
from delta_router.search.selector import TaskSelector

logger = logging.getLogger(__name__)

UNSEEN_SUITE = UNSEEN_SUITES["unseen"]


@dataclass(frozen=True)
class SuiteConfig:
    k: int = 3
    examples: int = 20
    held_out: int = 200
    seeds: int = 5
    screen: int = 50
    finalists: int = 3
    confidence: float = 0.95
    folds: int = 2
    seed: int = 0


class UnseenSuite:
    """``UnseenSuite(index).run(["sciq", ...])`` -> one result dict per task (see ``run_task``)."""

    def __init__(self, index: ModelIndex, config: SuiteConfig = SuiteConfig(), progress: bool = True):
        self.index, self.config, self.progress = index, config, progress
        self.selector = TaskSelector(index, progress=progress)

    def run(self, tasks: Sequence[str] = UNSEEN_SUITE) -> list[dict]:
        return [self.run_task(task) for task in tasks]

    def run_task(self, task: str) -> dict:
        cfg = self.config
        sizes = {"test_size": cfg.held_out, "fewshot_size": cfg.examples, "train_cap": 1}  # no training
        splits = load_domain(task, seed=cfg.seed, **sizes)
        examples, held_out = splits.fewshot, splits.test
        clock = time.perf_counter()
        selection = self.selector.select(examples, k=min(len(self.index), max(cfg.k, 5)))
        grid = candidate_grid(selection, Finetune.open(selection.task_adapter, "task"), cfg.k)
        verifier = TaskVerifier(
            self.selector, examples, folds=cfg.folds, seed=cfg.seed, confidence=cfg.confidence, progress=False
        )
        try:
            verdicts = {"selection": verifier.verify(grid, prior_candidate(grid, cfg.k))}
            verdicts["base"] = verdicts["selection"].with_prior(None)
            build_seconds = time.perf_counter() - clock
            logger.info("%s: build returned %s in %.0fs", task, verdicts["selection"].chosen, build_seconds)
            score = HeldOutScorer(verifier, task, held_out)
            # every candidate as build would write it (fitted ones refitted on all the examples)
            verified = {r.name for r in verdicts["selection"].results}  # a candidate may have been skipped
            candidates = {
                c.name: score(verifier.fit(c, examples, "final")) for c in grid if c.name in verified
            }
            ids = self.index.model_ids()
            randoms = []
            for seed in range(cfg.seeds):
                picked = random.Random(seed).sample(ids, cfg.k)
                members = tuple((self._finetune(i), 1.0 / cfg.k) for i in picked)
                randoms.append(score(Candidate(f"random-{cfg.k} seed {seed}", "merge", members)))
            screened = {i: score(single(self._finetune(i)), limit=cfg.screen) for i in ids}
            finalists = sorted(ids, key=lambda i: -screened[i].correct.mean())[: cfg.finalists]
            oracle_scores = {i: score(single(self._finetune(i))) for i in finalists}
            oracle = max(finalists, key=lambda i: oracle_scores[i].correct.mean())
        finally:
            verifier.close()
        models = {
            BASE_MODEL_NAME: candidates[BASE_MODEL_NAME],
            **{f"returned ({prior} prior)": candidates[v.chosen] for prior, v in verdicts.items()},
            "selected top-k": candidates[f"top-{cfg.k} linear"],
            "task LoRA": candidates["task LoRA"],
            "task head": candidates["task head"],
            "oracle single": oracle_scores[oracle],
        }
        result = _task_result(task, splits.manifest, selection, verdicts, models, randoms, oracle)
        result["build_seconds"] = build_seconds
        result["candidates_held_out"] = {
            name: Interval.of(s.correct.astype(float)).to_dict() for name, s in candidates.items()
        }
        return result

    def _finetune(self, model_id: str) -> Finetune:
        return Finetune.open(self.index.get(model_id).embedding.path, model_id)


def single(finetune: Finetune) -> Candidate:
    return Candidate(finetune.model_id, "single", ((finetune, 1.0),))


class HeldOutScorer:
    """Held-out scores of candidates patched into the verifier's base, cached on disk by content
    (``verifier`` may be None to read the cache only)."""

    def __init__(self, verifier: TaskVerifier | None, task: str, records: list[Record]):
        self.verifier, self.records = verifier, records
        self.directory = cache_dir("unseen", task)

    def cached(self, candidate: Candidate, limit: int | None = None) -> ExampleScores | None:
        """The stored scores of ``candidate`` on the first ``limit`` records, or None."""
        return self._read(self._path(candidate, limit))

    def __call__(self, candidate: Candidate, limit: int | None = None) -> ExampleScores:
        path = self._path(candidate, limit)
        scores = self._read(path)
        if scores is not None:
            return scores
        with self.verifier.patcher.patched(candidate) as model:
            scores = example_scores(model, self.verifier.tokenizer, self._records(limit))
        stored = {
            f: None if getattr(scores, f) is None else getattr(scores, f).tolist() for f in SCORE_FIELDS
        }
        atomic_write_text(path, json.dumps(stored))
        return scores

    @staticmethod
    def _read(path: Path) -> ExampleScores | None:
        if not path.exists():
            return None
        stored = json.loads(path.read_text())
        return ExampleScores(*(None if stored[f] is None else np.asarray(stored[f]) for f in SCORE_FIELDS))

    def _records(self, limit: int | None) -> list[Record]:
        return self.records[:limit] if limit else self.records

    def _path(self, candidate: Candidate, limit: int | None) -> Path:
        key = json.dumps(
            [[ft.content_hash, w] for ft, w in candidate.members]
            + [[r.to_dict() for r in self._records(limit)]],
            sort_keys=True,
        )
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


def _task_result(task, manifest, selection, verdicts, models, randoms, oracle) -> dict:
    """Accuracies with intervals, gains over the base (paired) and over random merges (over seeds)."""
    base = models[BASE_MODEL_NAME]
    accuracy = {name: Interval.of(s.correct.astype(float)).to_dict() for name, s in models.items()}
    random_means = np.asarray([float(r.correct.mean()) for r in randoms])
    accuracy["random merge"] = Interval.of(random_means).to_dict()
    gains = {
        name: Gain.paired(s.correct.astype(float), base.correct.astype(float)).interval.to_dict()
        for name, s in models.items()
        if name != BASE_MODEL_NAME
    }
    vs_random = {
        prior: Interval.of(float(models[f"returned ({prior} prior)"].correct.mean()) - random_means).to_dict()
        for prior in verdicts
    }
    return {
        "task": task,
        "description": UNSEEN_TASKS[task].description,
        "n_examples": selection.num_examples,
        "n_held_out": base.n,
        "data": {k: manifest[k] for k in ("package", "version", "wheel_sha256", "members", "seed")},
        "selected": [h.model_id for h in selection.hits],
        "returned": {prior: v.chosen for prior, v in verdicts.items()},
        "reason": {prior: v.reason for prior, v in verdicts.items()},
        "verification": verdicts["selection"].to_dict(),
        "oracle": oracle,
        "accuracy": accuracy,
        "random_accuracies": random_means.tolist(),
        "gain_over_base": gains,
        "returned_minus_random": vs_random,
    }


PRIOR_COLUMNS = ("returned (selection prior)", "returned (base prior)")


def write_report(results: Sequence[dict], out_dir: str | Path, command: str) -> Path:
    """``results.json``, ``README.md`` (tables per task, then the averages) and ``unseen.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(list(results), indent=2))
    columns = [
        "base", *PRIOR_COLUMNS, "selected top-k", "random merge", "task LoRA", "task head", "oracle single"
    ]  # fmt: skip

    def pct(a: dict | None, sign: str = "") -> str:
        if a is None:
            return "-"
        return f"{100 * a['mean']:{sign}.1f} [{100 * a['low']:{sign}.1f}, {100 * a['high']:{sign}.1f}]"

    def accuracy_row(r: dict) -> str:
        cells = " | ".join(pct(_accuracy(r, c)) for c in columns)
        return f"| {r['task']} (n={r['n_held_out']}) | {cells} |"

    lines = [
        "# Unseen-task suite: build on tasks no finetune of the index trained on",
        "",
        f"Last run: `{command}` (tasks run before it keep their rows; `make unseen` and `make unseen-dev` "
        "run the whole suites).",
        "",
        "Accuracy (%) on the held-out records, 95% intervals (per record; random merge: over seeds).",
        "",
        "| task | " + " | ".join(columns) + " |",
        "|---|" + "---|" * len(columns),
        *(accuracy_row(r) for r in results),
        "",
        "What build returned, and its gain (points) over the base (paired, 95%) and over the random merges:",
        "",
        "| task | selected (top-5) | prior | returned | - base | - random | build s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for prior, column in zip(("selection", "base"), PRIOR_COLUMNS, strict=True):
            lines.append(
                f"| {r['task']} | {', '.join(r['selected'])} | {prior} | {r['returned'][prior]} | "
                f"{pct(r['gain_over_base'][column], '+')} | {pct(r['returned_minus_random'][prior], '+')} | "
                f"{r['build_seconds']:.0f} |"
            )
    if results:
        lines += ["", f"Over {len(results)} tasks:", ""]
        for prior, column in zip(("selection", "base"), PRIOR_COLUMNS, strict=True):
            gains = [100 * r["gain_over_base"][column]["mean"] for r in results]
            vs_random = [100 * r["returned_minus_random"][prior]["mean"] for r in results]
            lines.append(
                f"- {prior} prior: returned - base {np.mean(gains):+.1f} points on average (worst task "
                f"{min(gains):+.1f}); returned - random merge {np.mean(vs_random):+.1f} points."
            )
        best = [max(c["mean"] for c in r["candidates_held_out"].values()) for r in results]
        ceiling = [100 * (b - np.mean(r["random_accuracies"])) for b, r in zip(best, results, strict=True)]
        lines.append(
            f"- ceiling of the verification: the best of build's candidates, picked in hindsight on the "
            f"held-out records, - random merge {np.mean(ceiling):+.1f} points (per task: "
            + ", ".join(f"{r['task']} {c:+.1f}" for r, c in zip(results, ceiling, strict=True))
            + ")."
        )
        lines += ["", "Why each build returned what it did:", ""]
        for r in results:
            lines += [f"- **{r['task']}**, {prior} prior: {why}." for prior, why in r["reason"].items()]
    lines += ["", "![accuracy per task](unseen.png)", ""]
    atomic_write_text(out_dir / "README.md", "\n".join(lines))
    _chart(results, columns, out_dir / "unseen.png")
    return out_dir


def _accuracy(result: dict, name: str) -> dict | None:
    """Held-out accuracy of a column of the report, or of any candidate ``build`` verified (results
    written before the column existed carry it there), or None."""
    return result["accuracy"].get(name) or result.get("candidates_held_out", {}).get(name)


def _chart(results: Sequence[dict], columns: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2 + 1.8 * max(len(results), 1), 4))
    width = 0.8 / len(columns)
    for j, name in enumerate(columns):
        means, errors = [], []
        for r in results:
            a = _accuracy(r, name)
            means.append(100 * a["mean"] if a else np.nan)
            errors.append(100 * (a["high"] - a["mean"]) if a else 0.0)
        ax.bar(np.arange(len(results)) + j * width, means, width, yerr=errors, capsize=2, label=name)
    ax.set_xticks(np.arange(len(results)) + 0.4 - width / 2, [r["task"] for r in results])
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("Unseen tasks: what build returns vs the base, random merges and the oracle")
    ax.legend(fontsize=7)
    return save_figure(fig, path)
