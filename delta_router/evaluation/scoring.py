"""Loglikelihood scoring of records: multiple-choice accuracy and answer NLL.

Multiple-choice records (with ``choices``) are scored like lm-eval's ``multiple_choice`` tasks: the
choice with the highest summed log-probability as a continuation of the prompt wins (``acc``), or
the highest log-probability per byte of the choice (``acc_norm``). Records without choices get the
mean negative log-likelihood per answer token (``nll``, lower is better).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from delta_router.data.sequences import (
    ANSWER_SEPARATOR,
    TokenSequence,
    collate,
    continuation_logprobs,
    encode,
)

if TYPE_CHECKING:
    from delta_router.data import Record


@dataclass(frozen=True)
class Score:
    """Scores of one model on records. ``acc``/``acc_norm`` are None without choices."""

    n: int
    acc: float | None
    acc_norm: float | None
    nll: float

    @property
    def main(self) -> float:
        """The headline number: ``acc`` for multiple choice, else ``-nll``."""
        return self.acc if self.acc is not None else -self.nll

    def to_dict(self) -> dict:
        return {"n": self.n, "acc": self.acc, "acc_norm": self.acc_norm, "nll": self.nll}


@torch.no_grad()
def sequence_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[TokenSequence],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> torch.Tensor:
    """Summed continuation log-probability of every sequence: [N] float32, in input order."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].ids))
    out = torch.empty(len(sequences))
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="score", disable=not progress):
        rows = order[start : start + batch_size]
        out[rows] = continuation_logprobs(model, collate([sequences[i] for i in rows], pad_id)).float()
    return out


def score_records(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Record],
    max_length: int = 256,
    batch_size: int = 16,
    progress: bool = False,
) -> Score:
    """Score ``model`` on ``records`` (all multiple-choice, or all free-form)."""
    if not records:
        raise ValueError("no records to score")
    mc = [r.choices is not None for r in records]
    if any(mc) and not all(mc):
        raise ValueError("mix of multiple-choice and free-form records: score them separately")
    model.eval()
    pad_id = tokenizer.pad_token_id
    if not all(mc):
        gold_seqs = [encode(tokenizer, r.prompt(), r.output, max_length) for r in records]
        logprobs = sequence_logprobs(model, gold_seqs, pad_id, batch_size, progress)
        n_tokens = sum(s.n_continuation for s in gold_seqs)
        return Score(len(records), None, None, float(-logprobs.sum() / n_tokens))

    flat = [(i, c) for i, r in enumerate(records) for c in r.choices]
    seqs = [encode(tokenizer, records[i].prompt(), choice, max_length) for i, choice in flat]
    logprobs = sequence_logprobs(model, seqs, pad_id, batch_size, progress)
    correct = correct_norm = 0
    nll_sum = n_tokens = 0.0
    offset = 0
    for record in records:
        k = len(record.choices)
        lp = logprobs[offset : offset + k]
        nbytes = torch.tensor([len((ANSWER_SEPARATOR + c).encode()) for c in record.choices])
        correct += int(lp.argmax()) == record.answer
        correct_norm += int((lp / nbytes).argmax()) == record.answer
        gold = seqs[offset + record.answer]
        nll_sum -= float(lp[record.answer])
        n_tokens += gold.n_continuation
        offset += k
    n = len(records)
    return Score(n, correct / n, correct_norm / n, nll_sum / n_tokens)
