"""The headline flow: examples of a task -> selected finetunes -> verified candidates -> one model.

``build_merged_model`` is what ``delta-router build`` runs:

1. ``TaskSelector.select`` ranks the index's finetunes for the examples (the top ``max(k, 5)``);
2. ``candidate_grid`` lists what could be returned: the base, the top singles, linear merges over k
   and weightings, the requested (k, recipe) merge, LoraHub weights learnt on the examples, the
   examples' own few-shot LoRA alone and merged with its neighbours, and the task head (a LoRA of
   the last blocks fitted to the examples);
3. ``TaskVerifier`` scores each candidate on the examples (the index's finetunes never saw them;
   candidates that learn from them are scored by cross-validation), and ``verification.choose``
   decides: with ``prior="selection"`` (default) the top-k linear merge is returned unless the
   examples show it hurts or another candidate clearly beats it; with ``prior="base"`` the base is
   kept unless a candidate beats it beyond the noise of the examples;
4. the chosen candidate is written with mergekit (the base is copied when it is kept), with every
   score and interval in ``delta_router.json``, the model card (``README.md``) and the result.

``verify=False`` merges the top-k with the recipe, unverified (the paper's protocol).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from delta_router.data import Record
from delta_router.errors import MergeError
from delta_router.evaluation.scoring import ExampleScores, Score, example_scores
from delta_router.evaluation.verification import Verdict, choose
from delta_router.home import atomic_directory, atomic_write_text, cache_dir, refuse_existing
from delta_router.merging.candidates import Candidate, DeltaPatcher
from delta_router.merging.lorahub import LoraHub
from delta_router.merging.merger import PROVENANCE_FILE, WEIGHTINGS, Merger, MergeRecipe
from delta_router.model_ids import BASE_MODEL_NAME
from delta_router.models.base import BaseLM
from delta_router.models.finetunes import Finetune
from delta_router.routing.router import Router
from delta_router.search.index import ModelIndex
from delta_router.search.selector import Selection, TaskSelector, read_examples
from delta_router.training.trainer import TrainConfig

logger = logging.getLogger(__name__)

OUTPUTS = ("model", "adapter")
PRIORS = ("selection", "base")  # what build returns unless the examples say otherwise
SELECT_AT_LEAST = 5  # candidates are drawn from this many top finetunes, whatever k is
# The "task head" candidate: a LoRA in the last 2 blocks trained to fit the examples (20 epochs). It
# learns what the few-shot LoRA of the selection (6 steps, every block) does not: the task's answers
# and their base rate. BioASQ yes/no (72% yes, the base always says no): 30.5% -> 72.0% on 200
# held-out records, the selection's few-shot LoRA 42.5% (benchmarks/RESULTS.md). The frozen 28 blocks
# run once per example (``training.prefix``): the 20 epochs cost about 4 forward passes of the model.
TASK_HEAD_CONFIG = TrainConfig(
    lora_layers=2, epochs=20, batch_size=20, micro_batch_size=10, learning_rate=2e-3, max_length=128
)


@dataclass
class BuildResult:
    out_dir: Path
    selection: Selection
    verdict: Verdict | None = None  # None when built unverified
    chosen: str = ""  # the candidate written (BASE_MODEL_NAME: the base was kept)
    seconds: dict[str, float] = field(default_factory=dict)
    scores: dict[str, Score] = field(default_factory=dict)  # held-out: "built", "top-1", "random-k", base

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "chosen": self.chosen,
            "selection": self.selection.to_dict(),
            "verification": self.verdict.to_dict() if self.verdict else None,
            "seconds": self.seconds,
            "scores": {name: score.to_dict() for name, score in self.scores.items()},
        }


def prior_candidate(grid: list[Candidate], k: int) -> str:
    """The name of the selection's own recommendation in ``grid``: the top-k linear merge (top-1 for k=1)."""
    names = [c.name for c in grid]
    wanted = f"top-{k} linear"
    if wanted in names:
        return wanted
    return next(n for n in names if n.startswith("top-1 ("))


def candidate_grid(
    selection: Selection, task_adapter: Finetune | None, k: int = 3, recipe: MergeRecipe | None = None
) -> list[Candidate]:
    """What ``build`` may return for a selection (each name unique; the base first)."""
    hits = selection.hits
    tops = [Finetune.open(h.entry.embedding.path, h.model_id) for h in hits]
    scores = [max(h.score, 0.0) for h in hits]
    grid = [Candidate(BASE_MODEL_NAME, "base")]
    for i, finetune in enumerate(tops[:3]):
        grid.append(Candidate(f"top-{i + 1} ({finetune.model_id})", "single", ((finetune, 1.0),)))
    for n in sorted({2, 3, 5, k} & set(range(2, len(tops) + 1))):
        grid.append(Candidate(f"top-{n} linear", "merge", tuple((ft, 1.0 / n) for ft in tops[:n])))
        if n >= 3 and sum(scores[:n]) > 0:
            weights = [s / sum(scores[:n]) for s in scores[:n]]
            members = tuple(zip(tops[:n], weights, strict=True))
            grid.append(Candidate(f"top-{n} linear, score-weighted", "merge", members))
    if recipe is not None and not recipe.is_linear and k >= 2:  # merged with mergekit to be scored
        grid.append(Candidate(f"top-{k} {recipe.name}", "merge", (), {"recipe": recipe, "sources": tops[:k]}))
    lora_tops = [ft for ft in tops if ft.kind == "lora"]
    if len(lora_tops) >= 2:
        grid.append(Candidate(f"lorahub top-{len(lora_tops)}", "lorahub", (), {"sources": lora_tops}))
    if task_adapter is not None:
        grid.append(Candidate("task LoRA", "task-lora", ((task_adapter, 1.0),)))
        grid.append(Candidate("task head", "task-lora", (), {"train": TASK_HEAD_CONFIG}))
        neighbours = tops[:3]
        weight = 1.0 / (len(neighbours) + 1)
        members = ((task_adapter, weight), *((ft, weight) for ft in neighbours))
        grid.append(Candidate(f"task LoRA + top-{len(neighbours)} linear", "task-lora", members))
    return grid


class TaskVerifier:
    """Scores candidates on a task's examples against the base: ``verify(grid) -> Verdict``.

    One base model is loaded and each candidate is patched into it in turn (``DeltaPatcher``).
    Candidates that learn from the examples (``Candidate.fitted``) are refitted on ``folds - 1``
    folds and scored on the held-out fold, so every example is scored by a model that never saw it.
    """

    def __init__(
        self,
        selector: TaskSelector,
        records: list[Record],
        folds: int = 2,
        seed: int = 0,
        confidence: float = 0.95,
        lorahub_budget: int = 24,
        progress: bool = True,
    ):
        if folds < 2:
            raise ValueError(f"folds must be at least 2, got {folds}")
        self.selector, self.records, self.confidence = selector, records, confidence
        self.lorahub_budget, self.progress = lorahub_budget, progress
        self.base: BaseLM = selector.embedder.base
        self.model = self.base.load_model()
        self.tokenizer = self.base.load_tokenizer()
        self.patcher = DeltaPatcher(self.model, self.base)
        order = np.random.default_rng(seed).permutation(len(records))
        self.folds = [fold for fold in np.array_split(order, min(folds, len(records))) if len(fold)]
        self.work = Path(tempfile.mkdtemp(prefix="verify-", dir=cache_dir("tmp")))

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)

    def score(self, candidate: Candidate, records: list[Record]) -> ExampleScores:
        with self.patcher.patched(candidate) as model:
            return example_scores(model, self.tokenizer, records)

    def fit(self, candidate: Candidate, records: list[Record], tag: str) -> Candidate:
        """``candidate`` made from ``records``: the few-shot LoRA retrained, LoraHub weights relearnt, a
        mergekit recipe merged. Candidates that need none of this come back unchanged."""
        if candidate.origin == "task-lora":
            adapter = Finetune.open(
                self.selector.task_finetune(records, candidate.details.get("train")), "task"
            )
            if not candidate.members:  # trained only here (the task head)
                return Candidate(candidate.name, candidate.origin, ((adapter, 1.0),), candidate.details)
            return candidate.with_member(0, adapter)
        if candidate.origin == "lorahub":
            hub = LoraHub(self.base, candidate.details["sources"], budget=self.lorahub_budget, progress=False)
            out = hub.fit(records).save(self.work / f"lorahub-{tag}")
            ids = [ft.model_id for ft in hub.finetunes]
            weights = dict(zip(ids, map(float, hub.weights_), strict=True))
            member = ((Finetune.open(out, "lorahub"), 1.0),)
            return Candidate(candidate.name, "lorahub", member, {"weights": weights})
        if "recipe" in candidate.details:
            merger = Merger(self.base, candidate.details["recipe"], progress=False)
            out = merger.merge(candidate.details["sources"], self.work / f"merge-{tag}")
            member = ((Finetune.open(out, "merged"), 1.0),)
            return Candidate(candidate.name, "merge", member, candidate.details)
        return candidate

    def cross_validated(self, candidate: Candidate) -> ExampleScores:
        """Every example scored by ``candidate`` refitted on the other folds: [n], in example order."""
        parts, order = [], []
        for i, fold in enumerate(self.folds):
            held = set(fold.tolist())
            train = [r for j, r in enumerate(self.records) if j not in held]
            fitted = self.fit(candidate, train, f"fold{i}")
            parts.append(self.score(fitted, [self.records[j] for j in fold]))
            order.extend(fold.tolist())
        return ExampleScores.concat(parts).subset(np.argsort(order))

    def verify(self, grid: list[Candidate], default: str | None = None) -> Verdict:
        """Score ``grid`` (the base first) and decide with ``choose`` (prior ``default``)."""
        base = self.score(grid[0], self.records)
        scored = []
        for candidate in tqdm(grid[1:], desc="verify", unit="candidate", disable=not self.progress):
            clock = time.perf_counter()
            try:
                if candidate.fitted:
                    scores = self.cross_validated(candidate)
                else:
                    scores = self.score(self.fit(candidate, self.records, "all"), self.records)
            except MergeError as exc:  # e.g. LoraHub over adapters of different ranks
                logger.warning("skipping candidate %s: %s", candidate.name, exc)
                continue
            scored.append((candidate.name, candidate.origin, scores, candidate.fitted))
            elapsed = time.perf_counter() - clock
            logger.info("%s: utility %.4f (%.1fs)", candidate.name, scores.utility.mean(), elapsed)
        if default is not None and default not in {name for name, *_ in scored}:
            default = None  # the prior candidate could not be scored: fall back to the base prior
        return choose(base, scored, self.confidence, default)


def build_merged_model(
    examples,
    index: ModelIndex,
    out_dir: str | Path,
    k: int = 3,
    recipe: str | Path = "linear",
    method: str = "finetune",
    weighting: str = "uniform",
    eval_examples=None,
    seed: int = 0,
    output: str = "model",
    rank: int | None = None,
    force: bool = False,
    progress: bool = True,
    verify: bool = True,
    confidence: float = 0.95,
    folds: int = 2,
    prior: str = "selection",
    router: Router | None = None,
) -> BuildResult:
    """Select finetunes for ``examples``, verify the candidates on them, write the chosen one to ``out_dir``.

    ``output="model"`` writes a full model with mergekit; ``"adapter"`` one LoRA adapter (PEFT), of
    rank ``rank`` for TIES-style recipes (see ``Merger.merge_adapters``). With ``verify=False`` the
    top-``k`` are merged with ``recipe`` and ``weighting`` without checking them against the base.
    ``router`` is the profiles ``method="queries"`` ranks by (see ``TaskSelector``).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if rank is not None and output != "adapter":
        raise ValueError("rank sets the rank of a merged adapter: it needs output='adapter'")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    recipe = MergeRecipe.load(recipe)  # every check before minutes of compute, not after
    out_dir = refuse_existing(out_dir, force)
    records = read_examples(examples)
    held_out = read_examples(eval_examples) if eval_examples is not None else None
    clock = time.perf_counter()
    selector = TaskSelector(index, method=method, progress=progress, router=router)
    depth = min(len(index), max(k, SELECT_AT_LEAST) if verify else k)
    selection = selector.select(records, k=depth)
    seconds = {f"select: {name}": s for name, s in selection.seconds.items()}
    seconds["select"] = time.perf_counter() - clock
    base = selector.embedder.base
    result = BuildResult(out_dir, selection, seconds=seconds)

    if not verify:
        clock = time.perf_counter()
        merger = Merger(base, recipe, weighting=weighting, seed=seed, progress=progress)
        paths = [h.entry.embedding.path for h in selection.hits]
        provenance = {"selection": selection.to_dict(), "verification": None}
        write = merger.merge if output == "model" else merger.merge_adapters
        options = {"rank": rank} if output == "adapter" else {}
        scores = [h.score for h in selection.hits]
        write(paths, out_dir, scores=scores, provenance=provenance, force=force, **options)
        result.chosen, seconds["merge"] = f"top-{k} {recipe.name}", time.perf_counter() - clock
    else:
        task = Finetune.open(selection.task_adapter, "task") if selection.task_adapter else None
        if task is None:  # the "activations" method trains no LoRA: the candidate still needs one
            task = Finetune.open(selector.task_finetune(records), "task")
        grid = candidate_grid(selection, task, k, recipe)
        verifier = TaskVerifier(
            selector, records, folds=folds, seed=seed, confidence=confidence, progress=progress
        )
        try:
            clock = time.perf_counter()
            verdict = verifier.verify(grid, prior_candidate(grid, k) if prior == "selection" else None)
            seconds["verify"] = time.perf_counter() - clock
            chosen = next(c for c in grid if c.name == verdict.chosen)
            clock = time.perf_counter()
            final = verifier.fit(chosen, records, "final")
            write_candidate(final, base, out_dir, output, selection, verdict, rank, force)
            seconds["write"] = time.perf_counter() - clock
        finally:
            verifier.close()
        result.verdict, result.chosen = verdict, verdict.chosen
        logger.info("%s", verdict.reason)
    if held_out is not None:
        clock = time.perf_counter()
        result.scores = compare_on_examples(held_out, out_dir, selection, index, base, k, seed)
        seconds["eval"] = time.perf_counter() - clock
    return result


def write_candidate(
    candidate: Candidate,
    base: BaseLM,
    out_dir: Path,
    output: str,
    selection: Selection,
    verdict: Verdict,
    rank: int | None = None,
    force: bool = False,
) -> Path:
    """Write ``candidate`` to ``out_dir`` (mergekit for a model, PEFT for an adapter; the base copied
    when it was kept) with the verification in ``delta_router.json`` and the model card."""
    provenance = {"selection": selection.to_dict(), "verification": verdict.to_dict()}
    members = candidate.members
    if output == "adapter":
        if any(ft.kind != "lora" for ft, _ in members):
            raise MergeError(f"{candidate.name} holds a full finetune: write it with output='model'")
        if not members:  # the base kept: a LoRA adapter that changes nothing (weight 0)
            members = ((Finetune.open(selection.hits[0].entry.embedding.path), 0.0),)
        merger = Merger(base, "linear", progress=False)
        merger.merge_adapters(
            [ft for ft, _ in members], out_dir, provenance=provenance, force=force, rank=rank,
            weights=[w for _, w in members],
        )  # fmt: skip
    elif not members:
        with atomic_directory(out_dir, force=force) as tmp:
            for path in base.path.iterdir():
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
            record = {"output": "model", "base": {"name": base.name, "fingerprint": base.fingerprint.id}}
            record = {**record, "models": [], **provenance}
            atomic_write_text(tmp / PROVENANCE_FILE, json.dumps(record, indent=2, default=str))
    else:
        merger = Merger(base, candidate.recipe(), progress=False)
        merger.merge(
            [ft for ft, _ in members], out_dir, provenance=provenance, force=force,
            weights=[w for _, w in members],
        )  # fmt: skip
    card = out_dir / "README.md"
    existing = card.read_text(encoding="utf-8") if card.exists() else f"# {out_dir.name}\n"
    atomic_write_text(card, existing.rstrip() + "\n\n" + verification_card(verdict) + "\n")
    return out_dir


def verification_card(verdict: Verdict) -> str:
    """The verification as a Markdown section of a model card: the decision and one row per candidate."""
    lines = [
        "## Verification on the task's examples (delta-router build)",
        "",
        f"**Returned: {verdict.chosen}.** {verdict.reason}.",
        "",
        "| candidate | kind | accuracy [95% interval] | utility | gain over base [95% interval] "
        "| lower bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in verdict.results:
        acc = r.accuracy
        acc_text = "-" if acc is None else f"{acc.mean:.3f} [{acc.low:.3f}, {acc.high:.3f}]"
        if r.gain is None:
            gain_text, bound = "-", "-"
        else:
            g = r.gain.interval
            gain_text, bound = f"{g.mean:+.3f} [{g.low:+.3f}, {g.high:+.3f}]", f"{r.gain.bound:+.3f}"
        kind = r.origin + (" (cross-validated)" if r.cross_validated else "")
        utility = r.scores.utility.mean()
        lines.append(f"| {r.name} | {kind} | {acc_text} | {utility:.4f} | {gain_text} | {bound} |")
    return "\n".join(lines)


def compare_on_examples(
    records: list[Record],
    built_dir: Path,
    selection: Selection,
    index: ModelIndex,
    base: BaseLM,
    k: int,
    seed: int = 0,
) -> dict[str, Score]:
    """Held-out scores of the built model, the top-1 candidate alone, a linear merge of ``k`` random
    finetunes of the index and the base, each patched into one loaded base."""
    model, tokenizer = base.load_model(), base.load_tokenizer()
    patcher = DeltaPatcher(model, base)
    random_ids = random.Random(seed).sample(index.model_ids(), k)
    built = Finetune.open(built_dir, "built")
    top1 = selection.hits[0]
    candidates = [
        Candidate("built", "merge", ((built, 1.0),)),
        Candidate(f"top-1 ({top1.model_id})", "single", ((Finetune.open(top1.entry.embedding.path), 1.0),)),
        Candidate(
            f"random-{k} linear",
            "merge",
            tuple((Finetune.open(index.get(i).embedding.path, i), 1.0 / k) for i in random_ids),
        ),
        Candidate(BASE_MODEL_NAME, "base"),
    ]
    scores = {}
    for candidate in candidates:
        with patcher.patched(candidate) as patched:
            scores[candidate.name] = example_scores(patched, tokenizer, records).summary()
        logger.info("%s: %s", candidate.name, scores[candidate.name])
    return scores
