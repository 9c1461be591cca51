"""``SharedContextHFLM``: lm-eval's HF model, scoring each context once for all its continuations.

lm-eval runs every (context, continuation) request as its own sequence, so a 4-choice question
costs four passes over its context. Here a context with several continuations runs once, and its
continuations (right-padded into one batch) run on copies of its KV cache: about 3x fewer tokens on
our multiple-choice splits, the same log-probabilities up to float rounding. Contexts with one
continuation (free-form answers), with one-token choices only (HFLM's logits cache already shares
those) and ones too long for the window take HFLM's own batched path.
"""

from __future__ import annotations

import inspect
from functools import cached_property

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

Request = tuple[tuple[str, str] | None, list[int], list[int]]  # (strings, context ids, continuation ids)
Answer = tuple[float, bool]  # (summed log-probability, continuation is the greedy decode)


class SharedContextHFLM(HFLM):
    """``HFLM`` whose loglikelihood requests share their context's forward pass (module docstring)."""

    def _loglikelihood_tokens(
        self, requests: list[Request], disable_tqdm: bool = False, override_bs: int | None = None
    ) -> list[Answer]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, _) in enumerate(requests):
            groups.setdefault(tuple(context), []).append(i)
        shared = {c: ids for c, ids in groups.items() if self._worth_sharing(c, ids, requests)}
        rest = [i for c, ids in groups.items() if c not in shared for i in ids]
        answers: list[Answer | None] = [None] * len(requests)
        if rest:
            scored = super()._loglikelihood_tokens([requests[i] for i in rest], disable_tqdm, override_bs)
            for i, answer in zip(rest, scored, strict=True):
                answers[i] = answer
        for context, ids in tqdm(shared.items(), desc="shared contexts", disable=disable_tqdm):
            scored = self._score_group(list(context), [requests[i][2] for i in ids])
            for i, answer in zip(ids, scored, strict=True):
                answers[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
        return answers

    def _worth_sharing(self, context: tuple[int, ...], ids: list[int], requests: list[Request]) -> bool:
        """Several continuations, some longer than one token (HFLM already shares one-token ones),
        all fitting the window."""
        lengths = [len(requests[i][2]) for i in ids]
        return len(ids) > 1 and max(lengths) > 1 and len(context) + max(lengths) <= self.max_length

    @cached_property
    def _forward_params(self) -> set[str]:
        return set(inspect.signature(self.model.forward).parameters)

    @property
    def _cache_name(self) -> str:
        """transformers 5 renames ``past_key_values`` to ``cache``, model by model."""
        return "cache" if "cache" in self._forward_params else "past_key_values"

    @torch.no_grad()
    def _score_group(self, context: list[int], continuations: list[list[int]]) -> list[Answer]:
        """The answer of each continuation of one context: one context pass, one batched pass."""
        # the LM head only at the last context position: it predicts every continuation's 1st token
        last_only = {"logits_to_keep": 1} if "logits_to_keep" in self._forward_params else {}
        out = self.model(torch.tensor([context], device=self.device), use_cache=True, **last_only)
        first = F.log_softmax(out.logits[0, -1:].float(), dim=-1)  # [1, vocab]
        n, width = len(continuations), max(len(c) for c in continuations) - 1
        rest = None
        if width > 0:  # tokens 2.. of each continuation, on n copies of the context's cache
            inputs = torch.zeros(n, width, dtype=torch.long, device=self.device)
            mask = torch.zeros(n, len(context) + width, dtype=torch.long, device=self.device)
            mask[:, : len(context)] = 1
            for row, cont in enumerate(continuations):
                inputs[row, : len(cont) - 1] = torch.tensor(cont[:-1])
                mask[row, len(context) : len(context) + len(cont) - 1] = 1
            cache = out[self._cache_name]
            cache.batch_repeat_interleave(n)
            logits = self.model(inputs, attention_mask=mask, **{self._cache_name: cache}).logits
            rest = F.log_softmax(logits.float(), dim=-1)  # [n, width, vocab]
        answers = []
        for row, cont in enumerate(continuations):
            logprobs = first if rest is None else torch.cat([first, rest[row, : len(cont) - 1]])
            target = torch.tensor(cont, device=self.device)
            greedy = bool((logprobs.argmax(-1) == target).all())
            answers.append((float(logprobs.gather(1, target[:, None]).sum()), greedy))
        return answers
