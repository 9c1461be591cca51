"""Continuous batching with per-row LoRA: the PEFT backend's decode loop.

``DecodeBatch`` runs requests as one batch that changes at every step. ``admit`` prefills a request
on its own (no padding to the longest prompt) and joins it to the running batch; ``step`` decodes one
token for every running row in one forward, and a row that finishes leaves at once, so a new arrival
never waits for a batch to drain. The rows' caches live in one left-padded batched KV cache
(``transformers.DynamicCache``), trimmed on the left when the longest rows leave.

``RowLora`` applies LoRA per row in forward hooks, grouped by adapter: on every target module, row r
gets ``sum_j w_rj * s_j * B_j (A_j x_r)``; that is one adapter (w = 1), a weighted top-k mix (exactly
PEFT's ``cat`` combination) or the base (no term). The base weights are never modified.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from delta_router.errors import InvalidModelError
from delta_router.model_ids import BASE_ADAPTER
from delta_router.models.base import BaseLM
from delta_router.models.finetunes import Finetune, load_lora_factors

logger = logging.getLogger(__name__)


@dataclass
class GenerationRequest:
    """One prompt to complete with ``adapter`` (an adapter id, a mix name, or ``BASE_ADAPTER``)."""

    prompt: str
    adapter: str = BASE_ADAPTER
    max_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy (deterministic)
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    min_tokens: int = 0  # EOS is ignored before this many tokens (benchmarks: fixed-length outputs)
    on_text: Callable[[str], None] | None = field(default=None, repr=False)  # streamed text deltas


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class TextStream:
    """One request's tokens as text: EOS, stop strings and ``max_tokens`` end it; new text is passed
    to ``request.on_text`` as it appears (a half multi-byte character waits for the rest)."""

    def __init__(self, tokenizer, request: GenerationRequest, eos_ids: set[int]):
        self.tokenizer, self.request, self.eos_ids = tokenizer, request, eos_ids
        self.tokens: list[int] = []
        self.text = ""
        self.finish: str | None = None  # "stop" or "length" once finished

    def push(self, token: int) -> None:
        if self.finish is not None:
            return
        request = self.request
        if token in self.eos_ids and len(self.tokens) >= request.min_tokens:
            self.finish = "stop"
            return
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in request.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            text, self.finish = text[:cut], "stop"
        elif len(self.tokens) >= request.max_tokens:
            self.finish = "length"
        elif text.endswith("\ufffd"):
            return
        if request.on_text and len(text) > len(self.text):
            request.on_text(text[len(self.text) :])
        self.text = text

    def result(self, prompt_tokens: int) -> GenerationResult:
        return GenerationResult(self.text, prompt_tokens, len(self.tokens), self.finish or "length")


# per target module: (A [r, in], scale * B [out, r]), in the model's dtype and device
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]
# what one row runs with: (adapter factors, weight) per adapter; [] is the base
RowAdapters = list[tuple[Factors, float]]


class RowLora:
    """LoRA factors of a backend's adapters (LRU-limited) and the hooks that apply them per row."""

    def __init__(self, model: torch.nn.Module, base: BaseLM, max_loaded: int):
        self.model, self.base, self.max_loaded = model, base, max_loaded
        self.modules = dict(model.named_modules())
        self.loaded: OrderedDict[str, Factors] = OrderedDict()  # least recently used first
        weight = next(model.parameters())
        self.dtype, self.device = weight.dtype, weight.device

    def read(self, path: str | Path) -> Factors:
        """The factors of the adapter at ``path``; ``InvalidModelError`` unless it is plain LoRA."""
        lora = load_lora_factors(Finetune.open(path), self.model, self.base)
        if not lora.plain:
            raise InvalidModelError(
                f"{path}: DoRA, modules_to_save, per-module alpha or biases need PEFT's own layers and "
                "cannot share a batch with other adapters; fold it into a full model to serve it"
            )
        return {
            name: (
                a.to(self.device, self.dtype).contiguous(),
                (b * scale).to(self.device, self.dtype).contiguous(),
            )
            for name, (a, b, scale) in lora.factors.items()
        }

    def get(self, name: str, path: str | Path, keep: set[str]) -> Factors:
        """``name``'s factors, read once; least recently used ones not in ``keep`` are evicted."""
        if name in self.loaded:
            self.loaded.move_to_end(name)
            return self.loaded[name]
        self.loaded[name] = self.read(path)
        logger.info("loaded adapter %s", name)
        while len(self.loaded) > self.max_loaded:
            victim = next((n for n in self.loaded if n not in keep | {name}), None)
            if victim is None:
                break
            del self.loaded[victim]
            logger.info("evicted adapter %s", victim)
        return self.loaded[name]

    def unload(self, name: str) -> None:
        self.loaded.pop(name, None)  # rows that run with it keep their own reference

    @contextlib.contextmanager
    def applied(self, rows: Sequence[RowAdapters]) -> Iterator[None]:
        """Inside the block, forwards of the model add row i's adapters to batch row i."""
        groups: dict[int, tuple[Factors, list[int], list[float]]] = {}
        for i, adapters in enumerate(rows):
            for factors, weight in adapters:
                group = groups.setdefault(id(factors), (factors, [], []))
                group[1].append(i)
                group[2].append(weight)
        per_module: dict[str, list] = {}
        for factors, indices, weights in groups.values():
            idx = torch.tensor(indices, device=self.device)
            w = torch.tensor(weights, device=self.device, dtype=self.dtype)
            every = indices == list(range(len(rows)))
            for name, (a, sb) in factors.items():
                per_module.setdefault(name, []).append((a, sb, None if every else idx, w))
        handles = [
            self.modules[name].register_forward_hook(_row_hook(terms)) for name, terms in per_module.items()
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _row_hook(terms: list):
    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        for a, sb, idx, w in terms:
            rows = x if idx is None else x.index_select(0, idx)
            delta = F.linear(F.linear(rows, a), sb) * w.view(-1, *([1] * (x.dim() - 1)))
            if idx is None:
                output.add_(delta)
            else:
                output.index_add_(0, idx, delta)
        return output

    return hook


@dataclass
class _Row:
    request: GenerationRequest
    adapters: RowAdapters
    stream: TextStream
    prompt_tokens: int
    length: int  # tokens in this row's cache
    next_token: int = -1  # chosen, not yet in the cache
    generator: torch.Generator | None = field(default=None, repr=False)


class DecodeBatch:
    """The running requests of a backend (see the module docstring)."""

    def __init__(self, model, tokenizer, lora: RowLora, eos_ids: set[int], max_context: int):
        self.model, self.tokenizer, self.lora = model, tokenizer, lora
        self.eos_ids, self.max_context = sorted(eos_ids), max_context
        self.rows: list[_Row] = []
        self.cache = None  # DynamicCache [B, H, L, D] per layer, left-padded
        self.mask: torch.Tensor | None = None  # [B, L] 1 = a real token
        self.device = lora.device

    def __len__(self) -> int:
        return len(self.rows)

    def requests(self) -> list[GenerationRequest]:
        return [row.request for row in self.rows]

    def abort(self) -> None:
        """Drop every running request and its cache (after a failed step)."""
        self.rows, self.cache, self.mask = [], None, None

    def admit(self, request: GenerationRequest, adapters: RowAdapters) -> GenerationResult | None:
        """Prefill ``request`` alone and join the batch; its ``GenerationResult`` if it finished at once."""
        ids = self.tokenizer(request.prompt, return_tensors="pt")["input_ids"][:, -(self.max_context - 1) :]
        stream = TextStream(self.tokenizer, request, set(self.eos_ids))
        generator = None
        if request.temperature > 0:
            generator = torch.Generator(self.device)
            generator.manual_seed(request.seed if request.seed is not None else torch.seed())
        row = _Row(request, adapters, stream, ids.shape[1], ids.shape[1], generator=generator)
        with torch.inference_mode(), self.lora.applied([adapters]):
            out = self.model(input_ids=ids.to(self.device), use_cache=True)
        if self._advance(row, self._choose(out.logits[:, -1], [row])[0]):
            return self._result(row)
        self._join(row, out.cache)
        return None

    def step(self) -> list[tuple[GenerationRequest, GenerationResult]]:
        """One token for every running row, in one forward; (request, result) of the rows that finished."""
        if not self.rows:
            return []
        inputs = torch.tensor([[row.next_token] for row in self.rows], device=self.device)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        positions = torch.tensor([[row.length] for row in self.rows], device=self.device)
        with torch.inference_mode(), self.lora.applied([row.adapters for row in self.rows]):
            out = self.model(input_ids=inputs, attention_mask=self.mask, position_ids=positions,
                             cache=self.cache, use_cache=True)  # fmt: skip
        for row in self.rows:
            row.length += 1
        tokens = self._choose(out.logits[:, -1], self.rows)
        done = [
            i
            for i, (row, token) in enumerate(zip(self.rows, tokens, strict=True))
            if self._advance(row, token)
        ]
        finished = [(self.rows[i].request, self._result(self.rows[i])) for i in done]
        if done:
            self._drop(done)
        return finished

    # ---- pieces --------------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
        """The next token of each row: greedy, or sampled with its temperature / top-p / generator."""
        logits = logits.float()
        tokens = []
        for i, row in enumerate(rows):
            scores = logits[i]
            if len(row.stream.tokens) < row.request.min_tokens:
                scores = scores.clone()
                scores[self.eos_ids] = float("-inf")
            if row.generator is None:
                tokens.append(int(scores.argmax()))
                continue
            probs = torch.softmax(scores / row.request.temperature, -1)
            ordered, order = probs.sort(descending=True)
            keep = ordered.cumsum(0) - ordered < row.request.top_p  # the nucleus, at least one token
            ordered = ordered * keep
            pick = torch.multinomial(ordered / ordered.sum(), 1, generator=row.generator)
            tokens.append(int(order[pick]))
        return tokens

    def _advance(self, row: _Row, token: int) -> bool:
        """Feed ``token`` to the row's text; True when the row is finished."""
        row.stream.push(token)
        row.next_token = token
        if row.stream.finish is None and row.length + 1 >= self.max_context:
            row.stream.finish = "length"  # out of context
        return row.stream.finish is not None

    @staticmethod
    def _result(row: _Row) -> GenerationResult:
        return row.stream.result(row.prompt_tokens)

    def _join(self, row: _Row, cache) -> None:
        if self.cache is None:
            self.rows, self.cache = [row], cache
            self.mask = torch.ones(1, row.length, dtype=torch.long, device=self.device)
            return
        width, new = self.mask.shape[1], row.length
        pad_old, pad_new = max(0, new - width), max(0, width - new)
        layers = [
            (
                torch.cat([F.pad(old.keys, (0, 0, pad_old, 0)), F.pad(one.keys, (0, 0, pad_new, 0))]),
                torch.cat([F.pad(old.values, (0, 0, pad_old, 0)), F.pad(one.values, (0, 0, pad_new, 0))]),
            )
            for old, one in zip(self.cache.layers, cache.layers, strict=True)
        ]
        self.cache = type(cache)(ddp_cache_data=layers)
        mask = torch.zeros(1, max(width, new), dtype=torch.long, device=self.device)
        mask[:, pad_new:] = 1
        self.mask = torch.cat([F.pad(self.mask, (pad_old, 0)), mask])
        self.rows.append(row)

    def _drop(self, indices: list[int]) -> None:
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        self.cache.batch_select_indices(torch.tensor(keep, device=self.device))
        self.mask = self.mask[keep]
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # columns that are padding only
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]
