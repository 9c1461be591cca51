"""Frozen blocks run once: when only the last blocks of a model train, what enters them never changes.

A task head (LoRA in the last 2 of 30 blocks, ``TrainConfig.lora_layers``) or a full finetune of the
last blocks (``unfreeze_last``) trains on top of blocks that stay frozen, so the hidden states
entering the first trained block are the same in every epoch. ``FrozenPrefix`` computes them once
per training sequence; each step then runs only the trained blocks (``answer_logprobs`` with
``inputs_embeds``). The losses are the same as a full forward's (the blocks see the same inputs,
positions and mask), at a fraction of the cost once a sequence is seen more than once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from delta_router.data.sequences import TokenSequence, answer_logprobs, causal_lm, collate

PREFIX_CACHE_BYTES = 1 << 30  # above this the states are not kept: every step runs every block


class FrozenPrefix:
    """The states entering block ``start`` of each of ``sequences``: ``[len(ids), d]`` float tensors."""

    def __init__(
        self,
        model: torch.nn.Module,
        sequences: Sequence[TokenSequence],
        start: int,
        pad_id: int,
        batch_size: int = 8,
    ):
        self.start, self.pad_id = start, pad_id
        self.body = causal_lm(model).get_decoder()
        self.states: dict[TokenSequence, torch.Tensor] = {}
        captured: list[torch.Tensor] = []
        hook = self.body.layers[start].register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        unique = list(dict.fromkeys(sequences))
        try:
            with torch.no_grad():
                for i in range(0, len(unique), batch_size):
                    chunk = unique[i : i + batch_size]
                    batch = collate(chunk, pad_id)
                    self.body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                    hidden = captured.pop()
                    for row, seq in enumerate(chunk):
                        self.states[seq] = hidden[row, : len(seq.ids)].clone()
        finally:
            hook.remove()

    @staticmethod
    def worth(sequences: Sequence[TokenSequence], passes: int, hidden_size: int) -> bool:
        """Whether caching pays: some sequence is seen more than once in ``passes`` sequence-passes,
        and the states fit ``PREFIX_CACHE_BYTES`` (float32)."""
        unique = set(sequences)
        size = sum(len(s.ids) for s in unique) * hidden_size * 4
        return passes > len(unique) and size <= PREFIX_CACHE_BYTES

    def answer_logprobs(
        self, model: torch.nn.Module, sequences: list[TokenSequence]
    ) -> tuple[torch.Tensor, ...]:
        """``answer_logprobs`` of ``sequences`` (one micro-batch), running only blocks ``start:``."""
        batch = collate(sequences, self.pad_id)
        first = self.states[sequences[0]]
        states = first.new_zeros(len(sequences), batch["input_ids"].shape[1], first.shape[-1])
        for row, seq in enumerate(sequences):
            states[row, : len(seq.ids)] = self.states[seq]
        with self._blocks_from_start():
            return answer_logprobs(model, batch, inputs_embeds=states)

    @contextlib.contextmanager
    def _blocks_from_start(self) -> Iterator[None]:
        """The body with only blocks ``start:`` inside the block (all of them again after it)."""
        layers = self.body.layers
        self.body.layers = torch.nn.ModuleList(list(layers)[self.start :])
        try:
            yield
        finally:
            self.body.layers = layers
