"""Loglikelihood scoring of records in process: multiple-choice accuracy and answer NLL per token.

Multiple-choice records (with ``choices``) are scored like lm-eval's ``multiple_choice`` tasks: the
choice with the highest summed log-probability as a continuation of the prompt wins (``acc``), or
the highest log-probability per character of the choice (``acc_norm``, lm-eval's definition).
Every record also gets the mean negative log-likelihood per token of its gold answer (``nll``,
lower is better): the headline number of free-form records.

Why this scorer and ``harness.LmEvaluator`` (lm-eval) both exist. ``eval`` and ``compare`` use
lm-eval: standard task configs, generative exact match, the numbers reported. ``build --eval``,
``zoo report`` and the training tests use this one. Same prompt (``Record.prompt``), same separator
(``ANSWER_SEPARATOR``), same summed log-probability per choice, so on multiple choice ``acc`` and
``acc_norm`` are lm-eval's (``tests/test_evaluation.py`` checks it). What differs:

- ``nll``: lm-eval's multiple-choice tasks report no likelihood of the gold answer, and its free-form
  ``loglik`` is the sum per document, which grows with the answer's length; ``nll`` is per answer
  token, on every record. ``build``'s table and ``BuildResult`` report it for each model, and the
  zoo report compares finetune and base of a free-form domain by it (cached as ``Score`` in the
  zoo's ``scores.json``).
- truncation: sequences are cut to ``max_length`` tokens exactly as training cuts them
  (``sequences.encode``: the prompt's tail, the answer's head), so the zoo report scores a finetune
  on text cut as it was trained on; lm-eval cuts the context on the left to the model's window.
  Records shorter than ``max_length`` score the same either way.
- tokenisation: prompt and answer are tokenised separately (as in training); lm-eval tokenises
  them together and splits. The tokens differ only where a token would span the boundary.
- in process: records in memory, no task files or datasets cache, any model object (the report
  swaps adapters of one ``PeftModel`` in place). Speed is not the reason: on 20-200 records of a
  small model neither is consistently faster (lm-eval adds under a second of setup per call).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from delta_router.data.sequences import (
    TokenSequence,
    collate,
    continuation_logprobs,
    encode,
)
from delta_router.serialize import to_json

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
        return to_json(self)


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
        nchars = torch.tensor([float(len(c)) for c in record.choices])  # lm-eval's acc_norm divisor
        correct += int(lp.argmax()) == record.answer
        correct_norm += int((lp / nchars).argmax()) == record.answer
        gold = seqs[offset + record.answer]
        nll_sum -= float(lp[record.answer])
        n_tokens += gold.n_continuation
        offset += k
    n = len(records)
    return Score(n, correct / n, correct_norm / n, nll_sum / n_tokens)
