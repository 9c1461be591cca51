"""The headline flow: examples of a task -> selected finetunes -> one merged model (-> scores).

``build_merged_model`` is what ``delta-router build`` runs: ``TaskSelector.select`` then
``Merger.merge`` with the selection's provenance; with held-out examples it also scores the merged
model against the best single candidate and a merge of k random candidates.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from delta_router.data import Record
from delta_router.evaluation.scoring import Score, score_records
from delta_router.home import cache_dir, refuse_existing
from delta_router.merging.merger import WEIGHTINGS, Merger, MergeRecipe, materialize
from delta_router.model_ids import BASE_MODEL_NAME
from delta_router.models.base import BaseLM
from delta_router.models.finetunes import Finetune
from delta_router.search.index import ModelIndex
from delta_router.search.selector import Selection, TaskSelector, read_examples

logger = logging.getLogger(__name__)

OUTPUTS = ("model", "adapter")


@dataclass
class BuildResult:
    out_dir: Path
    selection: Selection
    seconds: dict[str, float] = field(default_factory=dict)
    scores: dict[str, Score] = field(default_factory=dict)  # "merged", "best single", "random-k merge"

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "selection": self.selection.to_dict(),
            "seconds": self.seconds,
            "scores": {name: score.to_dict() for name, score in self.scores.items()},
        }


def build_merged_model(
    examples,
    index: ModelIndex,
    out_dir: str | Path,
    k: int = 3,
    recipe: str | Path = "ties",
    method: str = "finetune",
    weighting: str = "uniform",
    eval_examples=None,
    seed: int = 0,
    output: str = "model",
    rank: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> BuildResult:
    """Select the top-``k`` finetunes for ``examples`` and merge them into ``out_dir``.

    ``output="model"`` merges full models with mergekit; ``"adapter"`` merges LoRA adapters with
    PEFT into one small adapter (recipes linear, task_arithmetic, ties, dare_ties) of rank ``rank``
    for TIES-style recipes (default: the sum of the adapters' ranks; see ``Merger.merge_adapters``).
    """
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if rank is not None and output != "adapter":
        raise ValueError("rank sets the rank of a merged adapter: it needs output='adapter'")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    recipe = MergeRecipe.load(recipe)  # every check before minutes of compute, not after
    out_dir = refuse_existing(out_dir, force)
    held_out = read_examples(eval_examples) if eval_examples is not None else None
    clock = time.perf_counter()
    selector = TaskSelector(index, method=method, progress=progress)
    selection = selector.select(examples, k=k)
    seconds = {f"select: {name}": s for name, s in selection.seconds.items()}
    seconds["select"] = time.perf_counter() - clock

    base = selector.embedder.base
    merger = Merger(base, recipe, weighting=weighting, seed=seed, progress=progress)
    clock = time.perf_counter()
    paths = [h.entry.embedding.path for h in selection.hits]
    provenance = {"selection": selection.to_dict()}
    merge = merger.merge if output == "model" else partial(merger.merge_adapters, rank=rank)
    merge(paths, out_dir, scores=[h.score for h in selection.hits], provenance=provenance, force=force)
    seconds["merge"] = time.perf_counter() - clock
    result = BuildResult(out_dir, selection, seconds)
    if held_out is not None:
        clock = time.perf_counter()
        result.scores = compare_on_examples(held_out, out_dir, selection, index, merge, base, seed)
        seconds["eval"] = time.perf_counter() - clock
    return result


def compare_on_examples(
    records: list[Record],
    merged_dir: Path,
    selection: Selection,
    index: ModelIndex,
    merge: Callable[..., Path],
    base: BaseLM,
    seed: int = 0,
) -> dict[str, Score]:
    """Scores on ``records`` of the merged model, the top-1 candidate alone, a random-k merge (made
    with the same ``merge``), and the base."""
    from transformers import AutoModelForCausalLM

    tokenizer = base.load_tokenizer()
    k = len(selection.hits)
    rng = random.Random(seed)
    random_ids = rng.sample([e.model_id for e in index.list()], k)
    top1 = selection.hits[0].entry.embedding.path
    with tempfile.TemporaryDirectory(dir=cache_dir("tmp")) as tmp:
        random_dir = Path(tmp) / "random-merge"
        merge([index.get(i).embedding.path for i in random_ids], random_dir)
        models = {"merged": merged_dir, "best single": top1, f"random-{k} merge": random_dir}
        models[BASE_MODEL_NAME] = base.path
        scores = {}
        for name, path in models.items():
            full = materialize(Finetune.open(path), base)
            model = AutoModelForCausalLM.from_pretrained(str(full)).eval()
            scores[name] = score_records(model, tokenizer, records)
            logger.info("%s: %s", name, scores[name])
    return scores
