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
  swaps adapters of one ``PeftModel`` in place, ``build`` patches merged deltas into the base).
- per record: ``example_scores`` keeps every record's numbers (``ExampleScores``), so two models
  can be compared record by record (``evaluation.verification``).

A multiple-choice record whose choices share its prompt tokens (all but over-long ones) runs its
prompt once, batched with other records' prompts (left-padded), and its choices on copies of that
prompt's KV cache: the same log-probabilities up to float rounding, ~k x fewer tokens for k choices.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from delta_router.data.sequences import (
    TokenSequence,
    causal_lm,
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


SCORE_FIELDS = ("gold_logprob", "gold_tokens", "correct", "correct_norm", "gold_prob")


@dataclass(frozen=True)
class ExampleScores:
    """Per-record scores of one model on ``n`` records (arrays of shape [n]).

    ``gold_logprob``/``gold_tokens``: summed log-probability (nats) and token count of the gold answer.
    Multiple choice only (else None): ``correct`` (lm-eval's ``acc``: the gold choice has the highest
    summed log-probability), ``correct_norm`` (``acc_norm``: per character) and ``gold_prob``, the
    gold choice's share of the choices' probability (softmax over their summed log-probabilities):
    the expected accuracy of answering with a sample from the choices, a less noisy per-record signal
    than 0/1 correctness.
    """

    gold_logprob: np.ndarray
    gold_tokens: np.ndarray
    correct: np.ndarray | None = None
    correct_norm: np.ndarray | None = None
    gold_prob: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.gold_logprob)

    @property
    def utility(self) -> np.ndarray:
        """[n], higher is better: ``gold_prob`` for multiple choice, else minus the NLL per answer token."""
        if self.gold_prob is not None:
            return self.gold_prob
        return self.gold_logprob / self.gold_tokens

    @property
    def main(self) -> np.ndarray:
        """[n], per record what ``Score.main`` summarises: correct (0/1) for multiple choice, else
        minus the NLL per answer token."""
        return self.correct.astype(float) if self.correct is not None else self.utility

    def summary(self) -> Score:
        nll = float(-self.gold_logprob.sum() / self.gold_tokens.sum())
        if self.correct is None or self.correct_norm is None:
            return Score(self.n, None, None, nll)
        return Score(self.n, float(self.correct.mean()), float(self.correct_norm.mean()), nll)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ExampleScores:
        """The scores of the records at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=int)
        values = (getattr(self, name) for name in SCORE_FIELDS)
        return ExampleScores(*(None if v is None else v[idx] for v in values))

    @staticmethod
    def concat(parts: Sequence[ExampleScores]) -> ExampleScores:
        """The scores of several record lists, in order (the folds of a cross-validation)."""

        def joined(name: str) -> np.ndarray | None:
            values = [getattr(part, name) for part in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        return ExampleScores(*(joined(name) for name in SCORE_FIELDS))


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword of ``model.forward``'s KV cache: transformers 5 renames ``past_key_values`` to
    ``cache``, model by model."""
    return _cache_argument(type(model))


@cache
def _cache_argument(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


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


@torch.no_grad()
def shared_prompt_logprobs(
    model: torch.nn.Module, groups: Sequence[Sequence[TokenSequence]], pad_id: int
) -> list[torch.Tensor]:
    """Summed continuation log-probabilities of groups of sequences that share their prompt: [k_g] each.

    The prompts run once, left-padded into one batch; each group's continuations run on copies of
    its prompt's KV cache, right-padded. Every sequence of a group must have the group's prompt ids.
    """
    lm = causal_lm(model)
    device = lm.get_input_embeddings().weight.device
    prompts = [group[0].ids[: group[0].n_prompt] for group in groups]
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache_name = cache_argument(lm)
    out = lm(
        input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
        use_cache=True, logits_to_keep=1,
    )  # fmt: skip
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1).cpu()  # [G, vocab]: each 1st answer token
    owner = [g for g, group in enumerate(groups) for _ in group]
    answers = [seq.ids[seq.n_prompt :] for group in groups for seq in group]
    totals = torch.tensor([float(first[g, answer[0]]) for g, answer in zip(owner, answers, strict=True)])
    rest = max(len(a) for a in answers) - 1
    if rest > 0:  # tokens 2.. of every answer on its prompt's cache
        cache = out[cache_name]
        cache.batch_select_indices(torch.tensor(owner, device=device))
        inputs = torch.full((len(answers), rest), pad_id, dtype=torch.long)
        step_mask = torch.zeros((len(answers), width + rest), dtype=torch.long)
        step_mask[:, :width] = mask[owner]
        for row, answer in enumerate(answers):
            inputs[row, : len(answer) - 1] = torch.tensor(answer[:-1])
            step_mask[row, width : width + len(answer) - 1] = 1
        step_positions = mask[owner].sum(1, keepdim=True) + torch.arange(rest)
        hidden = lm.get_decoder()(
            input_ids=inputs.to(device), attention_mask=step_mask.to(device),
            position_ids=step_positions.to(device), **{cache_name: cache},
        ).last_hidden_state  # fmt: skip
        targets = torch.full((len(answers), rest), -1, dtype=torch.long)
        for row, answer in enumerate(answers):
            targets[row, : len(answer) - 1] = torch.tensor(answer[1:])
        valid = targets >= 0
        logits = lm.get_output_embeddings()(hidden[valid.to(device)]).float()
        logprobs = F.log_softmax(logits, dim=-1).gather(-1, targets[valid].to(device)[:, None])[:, 0]
        rows = torch.arange(len(answers))[:, None].expand_as(targets)[valid]
        totals.index_add_(0, rows, logprobs.cpu())
    sizes = [len(group) for group in groups]
    return list(totals.split(sizes))


def choice_logprobs(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[TokenSequence]],
    pad_id: int,
    batch_size: int = 16,
    progress: bool = False,
) -> list[torch.Tensor]:
    """Summed log-probability of each choice of each record: ``sequences[i]`` are record i's choices.

    Records whose choices share their prompt tokens go through ``shared_prompt_logprobs``, ``batch_size``
    prompts at a time (longest first, so a slow batch shows early); the rest through
    ``sequence_logprobs``.
    """
    out: list[torch.Tensor | None] = [None] * len(sequences)
    shared = [i for i, seqs in enumerate(sequences) if len({s.ids[: s.n_prompt] for s in seqs}) == 1]
    alone = sorted(set(range(len(sequences))) - set(shared))
    if alone:
        flat = [seq for i in alone for seq in sequences[i]]
        parts = sequence_logprobs(model, flat, pad_id, batch_size).split([len(sequences[i]) for i in alone])
        for i, part in zip(alone, parts, strict=True):
            out[i] = part
    shared.sort(key=lambda i: -sequences[i][0].n_prompt)
    starts = range(0, len(shared), batch_size)
    for start in tqdm(starts, desc="score", disable=not progress):
        rows = shared[start : start + batch_size]
        for i, part in zip(
            rows, shared_prompt_logprobs(model, [sequences[i] for i in rows], pad_id), strict=True
        ):
            out[i] = part
    return out  # type: ignore[return-value]


def example_scores(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Record],
    max_length: int = 256,
    batch_size: int = 16,
    progress: bool = False,
    prompt_format: str = "alpaca",
) -> ExampleScores:
    """Per-record scores of ``model`` on ``records`` (all multiple-choice, or all free-form), prompted
    in ``prompt_format`` (``PROMPT_FORMATS``)."""
    if not records:
        raise ValueError("no records to score")
    mc = [r.choices is not None for r in records]
    if any(mc) and not all(mc):
        raise ValueError("mix of multiple-choice and free-form records: score them separately")
    model.eval()
    pad_id = tokenizer.pad_token_id

    def prompt(record: Record) -> str:
        return record.formatted(prompt_format, tokenizer)

    if not all(mc):
        gold_seqs = [encode(tokenizer, prompt(r), r.output, max_length) for r in records]
        logprobs = sequence_logprobs(model, gold_seqs, pad_id, batch_size, progress)
        return ExampleScores(logprobs.double().numpy(), np.array([s.n_continuation for s in gold_seqs]))

    seqs = [[encode(tokenizer, prompt(r), choice, max_length) for choice in r.choices] for r in records]
    per_record = choice_logprobs(model, seqs, pad_id, batch_size, progress)
    answers = [record.answer for record in records]
    gold = [float(lp[a]) for lp, a in zip(per_record, answers, strict=True)]
    gold_tokens = [s[a].n_continuation for s, a in zip(seqs, answers, strict=True)]
    correct, correct_norm, gold_prob = [], [], []
    for record, lp in zip(records, per_record, strict=True):
        nchars = torch.tensor([float(len(c)) for c in record.choices])  # lm-eval's acc_norm divisor
        correct.append(int(lp.argmax()) == record.answer)
        correct_norm.append(int((lp / nchars).argmax()) == record.answer)
        gold_prob.append(float(torch.softmax(lp.double(), 0)[record.answer]))
    return ExampleScores(
        np.array(gold), np.array(gold_tokens), np.array(correct), np.array(correct_norm), np.array(gold_prob)
    )


def score_records(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[Record],
    max_length: int = 256,
    batch_size: int = 16,
    progress: bool = False,
    prompt_format: str = "alpaca",
) -> Score:
    """Score ``model`` on ``records`` (all multiple-choice, or all free-form) in ``prompt_format``."""
    return example_scores(
        model, tokenizer, records, max_length, batch_size, progress, prompt_format
    ).summary()
