"""Prompt + continuation token sequences, the shared unit of training and loglikelihood scoring.

A sequence is the prompt's tokens followed by the continuation's; only continuation tokens carry a
loss (labels of prompt and padding tokens are -100). Training and scoring tokenise alike, so a
finetune is scored on exactly the kind of text it was trained on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
ANSWER_SEPARATOR = " "  # between the prompt's "### Response:" and the answer text
# No token of these vocabularies spans more characters, so a text cut at this many characters per
# token of budget still fills the budget; huge inputs never reach the tokenizer whole.
MAX_CHARS_PER_TOKEN = 32

logger = logging.getLogger(__name__)


def clip_text(text: str, max_tokens: int, keep: str = "head") -> str:
    """``text`` cut to ``max_tokens * MAX_CHARS_PER_TOKEN`` characters (its head or tail), with a warning.

    Tokenising then truncates to ``max_tokens`` exactly; this bounds the tokenizer's memory.
    """
    limit = max_tokens * MAX_CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    logger.warning("a text of %d characters was cut to fit %d tokens", len(text), max_tokens)
    return text[:limit] if keep == "head" else text[len(text) - limit :]


@dataclass(frozen=True)
class TokenSequence:
    """Token ids of one prompt + continuation; ``n_prompt`` leading ids get no loss."""

    ids: tuple[int, ...]
    n_prompt: int

    @property
    def n_continuation(self) -> int:
        return len(self.ids) - self.n_prompt


def encode(tokenizer, prompt: str, answer: str, max_length: int = 256, eos: bool = False) -> TokenSequence:
    """Tokenise ``prompt`` and the continuation ``ANSWER_SEPARATOR + answer`` separately, join them.

    With ``eos`` the continuation ends with the EOS token (training: the model learns to stop).

    Over ``max_length`` tokens, the continuation keeps at most half of the budget (its head) and the
    prompt keeps its tail, so the ``### Response:`` marker right before the answer survives.
    """
    prompt = clip_text(prompt, max_length, keep="tail")
    answer = clip_text(answer, max_length)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cont_ids = tokenizer(ANSWER_SEPARATOR + answer, add_special_tokens=False)["input_ids"]
    if eos and tokenizer.eos_token_id is not None:
        cont_ids = [*cont_ids, tokenizer.eos_token_id]
    if len(prompt_ids) + len(cont_ids) > max_length:
        cont_ids = cont_ids[: max(max_length // 2, max_length - len(prompt_ids))]
        prompt_ids = prompt_ids[len(prompt_ids) - (max_length - len(cont_ids)) :]
    return TokenSequence(tuple(prompt_ids) + tuple(cont_ids), len(prompt_ids))


def collate(sequences: list[TokenSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: ``input_ids``, ``attention_mask`` and ``labels``, each [B, T] int64."""
    width = max(len(s.ids) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids = torch.tensor(seq.ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, seq.n_prompt : len(ids)] = ids[seq.n_prompt :]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT model (its LoRA layers stay active), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def answer_logprobs(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], inputs_embeds: torch.Tensor | None = None
) -> tuple[torch.Tensor, ...]:
    """log p of every answer token: ([n] float32, [n] row index), for ``collate``'s labels.

    Runs the decoder body, then the LM head only at positions that predict an answer token: the
    full [B, T, vocab] logits (0.4 GB for 8 x 256 tokens of SmolLM2) are never materialised.
    ``model`` is an HF causal LM or a PEFT model wrapping one. ``inputs_embeds`` ([B, T, d]) stand
    in for the token embeddings of ``batch["input_ids"]`` (e.g. the states entering the body's blocks).
    """
    lm = causal_lm(model)
    body, head = lm.get_decoder(), lm.get_output_embeddings()
    attention = batch["attention_mask"]
    if inputs_embeds is None:
        output = body(input_ids=batch["input_ids"], attention_mask=attention)
    else:
        output = body(inputs_embeds=inputs_embeds, attention_mask=attention, use_cache=False)
    hidden = output.last_hidden_state
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logits = head(hidden[:, :-1][mask]).float()  # [n, vocab]
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)
    rows = torch.arange(targets.shape[0]).unsqueeze(1).expand_as(targets)[mask]
    return logprobs, rows


def continuation_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(answer token) per row: [B] float32."""
    logprobs, rows = answer_logprobs(model, batch)
    return torch.zeros(batch["input_ids"].shape[0]).index_add_(0, rows, logprobs)
