"""``TaskSelector``: "here are 20 examples of my task" -> the closest finetunes in an index.

Methods (``SELECTION_METHODS``):

- ``"finetune"`` (the paper's): briefly LoRA-finetune the base on the examples (seeded, cached by
  the examples' hash), embed that finetune with the index's ``DeltaEmbedder`` settings, search.
- ``"activations"`` (training-free): the base's pooled activation on the examples (prompt +
  answer) minus its activation on the probes, ``[d]``, searched in the same index. No training;
  one forward over the examples.
- ``"queries"`` (format-neutral): what the examples ask, not how they answer. Their task texts
  (instruction + input; no answer, no template) are encoded by the base as a ``Router`` encodes
  queries, and each model's score is the mean cosine of the examples to its router profile (profiles
  from the finetunes' prompts, or data-free from their weights: ``route fit``). A task LoRA learns
  the answer format first: on the full zoo, the same questions answered by letter retrieve the right
  domain 1 time in 5 by ``"finetune"`` and 5 in 5 by ``"queries"`` (reports/task_format.md).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from delta_router import checks
from delta_router.data import Record, load_records
from delta_router.data.sequences import ANSWER_SEPARATOR
from delta_router.embedding.embedder import DeltaEmbedder
from delta_router.errors import DataError
from delta_router.home import cache_dir
from delta_router.routing.router import QueryEncoder, Router, query_text
from delta_router.search.index import ModelIndex, SearchHit
from delta_router.training.trainer import LoraTrainer, TrainConfig, records_hash

logger = logging.getLogger(__name__)

SELECTION_METHODS = ("finetune", "activations", "queries")
INDEX_METHODS = ("finetune", "activations")  # the methods that need nothing but the index
# The few-shot LoRA of a task's examples: 6 steps of 16 128-token examples (seconds on 2 cores). The
# zoo's finetunes are trained with it too, so task and zoo deltas are comparable.
FEWSHOT_TRAIN_CONFIG = TrainConfig(max_steps=6, max_length=128)
MIN_EXAMPLES = 5


@dataclass
class Selection:
    """Ranked candidates for one task; ``hits[i].score`` is the cosine similarity."""

    method: str
    examples_sha256: str
    num_examples: int
    hits: list[SearchHit]
    query: np.ndarray  # [d] float32, the task's vector (index space; router query space for "queries")
    seconds: dict[str, float] = field(default_factory=dict)
    task_adapter: str | None = None  # the few-shot finetune ("finetune" method)

    @property
    def model_ids(self) -> list[str]:
        return [h.model_id for h in self.hits]

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "examples_sha256": self.examples_sha256,
            "num_examples": self.num_examples,
            "task_adapter": self.task_adapter,
            "candidates": [
                {
                    "rank": h.rank,
                    "model_id": h.model_id,
                    "score": h.score,
                    "tags": h.entry.tags,
                    "path": h.entry.embedding.path,
                }
                for h in self.hits
            ],  # fmt: skip
            "seconds": self.seconds,
        }


def read_examples(examples: str | Path | Sequence[Record | dict]) -> list[Record]:
    """Examples from a JSONL/CSV file, or a list of Records / dicts (read as ``Record.from_dict`` reads
    a file's rows); at least ``MIN_EXAMPLES``, none with an empty output."""
    if isinstance(examples, (str, Path)):
        records = load_records(examples)
    else:
        records = [_example(row, i) for i, row in enumerate(examples, 1)]
        for i, record in enumerate(records, 1):
            if not record.output.strip():
                raise DataError(f"example {i} has an empty output")
    if len(records) < MIN_EXAMPLES:
        raise DataError(f"got {len(records)} examples; at least {MIN_EXAMPLES} are needed (20 is typical)")
    return records


def _example(row: Record | dict, number: int) -> Record:
    """A Record as is; a dict by ``Record.from_dict``'s rules (those of an examples file)."""
    if isinstance(row, Record):
        return row
    try:
        return Record.from_dict(row)
    except DataError as exc:
        raise DataError(f"example {number}: {exc}") from exc


class TaskSelector:
    """Selects finetunes for a task: ``TaskSelector(index).select(examples, k=3)``.

    The few-shot finetune uses ``FEWSHOT_TRAIN_CONFIG`` by default (the full zoo's recipe), so the
    task's vector is comparable with the zoo's; ~1 min on 2 CPU cores. ``prompt_format`` renders the
    examples (for training, or for the activations) in one of ``PROMPT_FORMATS``. The ``"queries"``
    method needs ``router``, fitted on the same base; models of the index it does not profile are
    not ranked.
    """

    def __init__(
        self,
        index: ModelIndex,
        method: str = "finetune",
        train_config: TrainConfig | None = None,
        embedder: DeltaEmbedder | None = None,
        progress: bool = True,
        prompt_format: str | None = None,
        router: Router | None = None,
    ):
        if not isinstance(index, ModelIndex):
            raise TypeError(f"index must be a ModelIndex (ModelIndex.load(DIR)), got {type(index).__name__}")
        if method not in SELECTION_METHODS:
            raise ValueError(f"method must be one of {SELECTION_METHODS}, got {method!r}")
        if method == "queries" and router is None:
            raise DataError(
                "selecting by queries needs a router of the index's models "
                "(delta-router route fit --index DIR --data-free --out ROUTER)"
            )
        if index.space is None or len(index) == 0:
            raise DataError("the index is empty: add finetunes before selecting from it")
        self.index, self.method, self.progress = index, method, progress
        self.train_config = (train_config or FEWSHOT_TRAIN_CONFIG).with_options(prompt_format=prompt_format)
        self.embedder = embedder or DeltaEmbedder.for_space(index.space, progress=progress)
        index.space.check_same(self.embedder.space, "the index", "the selector's embedder")
        self.router = router
        if router is not None:
            router.check_base(self.embedder.base.fingerprint, "the index's base")

    def select(self, examples: str | Path | Sequence[Record | dict], k: int = 3) -> Selection:
        checks.count(k, "k")
        records = read_examples(examples)
        if k > len(self.index):
            raise DataError(f"k={k} but the index holds only {len(self.index)} models")
        digest = records_hash(records)
        clock = time.perf_counter()
        adapter = None
        if self.method == "finetune":
            adapter = self.task_finetune(records)
            seconds = {"finetune": time.perf_counter() - clock}
            clock = time.perf_counter()
            query = self.embedder.embed_one(adapter, f"task-{digest[:12]}").vector
            seconds["embed"] = time.perf_counter() - clock
        elif self.method == "queries":
            query, hits = self._by_queries(records, k)
            seconds = {"queries": time.perf_counter() - clock}
            logger.info("selected %s (queries)", [h.model_id for h in hits])
            return Selection(self.method, digest, len(records), hits, query, seconds)
        else:
            tokenizer, fmt = self.embedder.tokenizer, self.train_config.prompt_format
            texts = [r.formatted(fmt, tokenizer) + ANSWER_SEPARATOR + r.output for r in records]
            acts = self.embedder.text_activations(texts).mean(0)
            query = (acts - self.embedder.base_activations().mean(0)).numpy().astype(np.float32)
            seconds = {"activations": time.perf_counter() - clock}
        clock = time.perf_counter()
        hits = self.index.search(query, k=k)
        seconds["search"] = time.perf_counter() - clock
        logger.info("selected %s (%s)", [h.model_id for h in hits], self.method)
        return Selection(self.method, digest, len(records), hits, query, seconds, adapter and str(adapter))

    def _by_queries(self, records: Sequence[Record], k: int) -> tuple[np.ndarray, list[SearchHit]]:
        """The mean centred encoding of the examples' task texts ``[d]``, and the top-``k`` models by
        mean cosine of the examples to their profiles."""
        router = self.router
        rows = [i for i, m in enumerate(router.model_ids) if m in self.index]  # profiles of indexed models
        if k > len(rows):
            raise DataError(f"k={k} but only {len(rows)} indexed models have a router profile")
        if len(rows) < len(router.model_ids) or len(rows) < len(self.index):
            logger.warning(
                "ranking the %d models both the index and the router hold (index %d, router %d)",
                len(rows), len(self.index), len(router.model_ids),
            )  # fmt: skip
        options = router.encoder_options
        encoder = QueryEncoder.for_model(self.embedder.model, self.embedder.tokenizer, **options)
        features = encoder([query_text(r) for r in records]).numpy()
        scores = router.similarities(features)[:, rows].mean(0)
        order = np.argsort(-scores, kind="stable")[:k]
        hits = [
            SearchHit(n, router.model_ids[rows[i]], float(scores[i]), self.index)
            for n, i in enumerate(order, 1)
        ]
        return (features - router.center).mean(0).astype(np.float32), hits

    def task_finetune(self, records: Sequence[Record], config: TrainConfig | None = None) -> Path:
        """The few-shot LoRA of ``records``, trained once and cached by examples + recipe + base.
        ``config``: another recipe than the selector's (the prompt format stays the selector's)."""
        config = (
            self.train_config
            if config is None
            else config.with_options(prompt_format=self.train_config.prompt_format)
        )
        digest = records_hash(records)
        config_hash = hashlib.sha256(json.dumps(config.to_dict()).encode()).hexdigest()[:8]
        out = cache_dir("tasks") / f"{digest[:16]}-{config_hash}-{self.embedder.base.fingerprint.id}"
        LoraTrainer(self.embedder.base, config, progress=self.progress).fit(
            records, out, data={"source": "few-shot examples"}
        )
        return out
