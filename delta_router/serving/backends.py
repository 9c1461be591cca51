"""Generation backends: one batch of requests, each with its own adapter, in one forward per step.

- ``PeftBackend`` (default, in-process): the base once, adapters' LoRA factors read lazily
  (LRU-limited) and applied per row, grouped by adapter (``serving.decoding``); requests are
  continuously batched (``decode_batch``): each is prefilled alone and joins the running decode
  batch at the next step. Weighted top-k mixes are exact (PEFT's ``cat`` combination).
- ``VllmBackend`` (GPU, ``pip install 'delta-router[vllm]'``): vLLM's multi-LoRA engine, one
  ``LoRARequest`` per routed request, requests added to the running engine and stepped (vLLM
  batches them; text streams as it is decoded); routing still encodes queries with the HF base.

Both run requests as a continuous batch: ``decode_batch()``, ``admit(batch, request)``,
``batch.step()`` -> the (request, result) pairs that finished; ``generate`` is that loop.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import sys
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from delta_router.errors import DeltaRouterError, InvalidModelError
from delta_router.model_ids import BASE_ADAPTER
from delta_router.models.base import BaseLM, resolve_device
from delta_router.routing.router import QueryEncoder, RouteDecision
from delta_router.serving.decoding import (
    DecodeBatch,
    GenerationRequest,
    GenerationResult,
    RowAdapters,
    RowLora,
)

logger = logging.getLogger(__name__)


class AdapterSet:
    """What every backend shares: the served adapters, ``{id: directory}`` (changed at run time by the
    registry), and ``generate`` on top of the backend's continuous batch (``decode_batch``, ``admit``)."""

    adapters: dict[str, Path]

    def model_ids(self) -> list[str]:
        return list(self.adapters)

    def add_adapter(self, name: str, path: str | Path) -> None:
        self.adapters[name] = Path(path)

    def remove_adapter(self, name: str) -> None:
        del self.adapters[name]

    def check_adapter(self, path: str | Path) -> None:
        """Raise ``DeltaRouterError`` if this backend cannot serve the adapter at ``path``."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Complete ``requests`` (any adapters and sampling settings) as one continuous batch."""
        batch = self.decode_batch()
        results: dict[int, GenerationResult] = {}
        for i, request in enumerate(requests):
            done = self.admit(batch, request)
            if done is not None:
                results[i] = done
        position = {id(r): i for i, r in enumerate(requests)}
        while len(batch):
            for request, result in batch.step():
                results[position[id(request)]] = result
        return [results[i] for i in range(len(requests))]


class PeftBackend(AdapterSet):
    """In-process generation: the base, LoRA adapters applied per row, continuous batching."""

    name = "peft"

    def __init__(
        self,
        base: BaseLM,
        adapters: Mapping[str, str | Path],
        max_loaded: int = 8,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_context: int | None = None,
    ):
        if max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")
        self.base, self.adapters = base, {k: Path(v) for k, v in adapters.items()}
        self.device = resolve_device(device)
        self.model = base.load_model(dtype, self.device).requires_grad_(False)
        self.tokenizer = base.load_tokenizer()
        # the HTTP thread counts tokens while the worker encodes: fast tokenizers are not thread-safe
        self._counter = base.load_tokenizer()
        limit = self.model.config.max_position_embeddings
        self.max_context = min(max_context or limit, limit)
        self.lora = RowLora(self.model, base, max_loaded)
        self.mixes: dict[str, tuple[list[str], list[float]]] = {}
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {*(eos if isinstance(eos, list) else [eos]), self.tokenizer.eos_token_id} - {None}

    @property
    def loaded(self) -> list[str]:
        """Adapters whose factors are in memory, least recently used first."""
        return list(self.lora.loaded)

    # ---- what the server asks ------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        return len(self._counter(text)["input_ids"])

    def encoder(self, **options) -> QueryEncoder:
        return QueryEncoder.for_model(self.model, self.tokenizer, **options)

    def target(self, decision: RouteDecision) -> str:
        """The adapter name that serves ``decision``: one adapter, a weighted mix, or the base."""
        if len(decision.adapters) <= 1:
            return decision.adapters[0] if decision.adapters else BASE_ADAPTER
        spec = ",".join(f"{a}={w:.2f}" for a, w in zip(decision.adapters, decision.weights, strict=True))
        name = "mix_" + hashlib.sha1(spec.encode()).hexdigest()[:12]
        self.mixes.setdefault(name, (list(decision.adapters), list(decision.weights)))
        return name

    # ---- adapters ------------------------------------------------------------------------------
    def check_adapter(self, path: str | Path) -> None:
        """Refuse an adapter that cannot be served per row (DoRA, modules_to_save, ...)."""
        self.lora.read(path)

    def remove_adapter(self, name: str) -> None:
        """Stop serving ``name``, and every weighted mix that uses it; running rows finish with it."""
        super().remove_adapter(name)
        for mix in [m for m, (parts, _) in self.mixes.items() if name in parts]:
            del self.mixes[mix]
        self.lora.unload(name)

    def row_adapters(self, name: str, keep: set[str] = frozenset()) -> RowAdapters:
        """What a row served by ``name`` (adapter, mix or ``BASE_ADAPTER``) runs with."""
        if name == BASE_ADAPTER:
            return []
        parts, weights = self.mixes.get(name, ([name], [1.0]))
        unknown = [part for part in parts if part not in self.adapters]
        if unknown:
            raise InvalidModelError(f"unknown adapter {unknown[0]!r}")
        # rows hold their factors: evicting an adapter that running rows use only costs a re-read
        keep = set(keep) | set(parts)
        return [(self.lora.get(p, self.adapters[p], keep), w) for p, w in zip(parts, weights, strict=True)]

    # ---- generation ----------------------------------------------------------------------------
    def decode_batch(self) -> DecodeBatch:
        """A new continuous batch (the scheduler keeps one running)."""
        return DecodeBatch(self.model, self.tokenizer, self.lora, self.eos_ids, self.max_context)

    def admit(self, batch: DecodeBatch, request: GenerationRequest) -> GenerationResult | None:
        """Prefill ``request`` into ``batch``; its result if it finished at once."""
        return batch.admit(request, self.row_adapters(request.adapter))


class VllmBackend(AdapterSet):
    """vLLM multi-LoRA generation (GPU). Queries are still routed with an HF copy of the base.

    Top-1 routing only: vLLM serves one LoRA per request, so weighted mixes fall back to their
    highest-weighted adapter.
    """

    name = "vllm"

    def __init__(
        self, base: BaseLM, adapters: Mapping[str, str | Path], max_loaded: int = 8, **engine_options
    ):
        if "vllm" not in sys.modules and importlib.util.find_spec("vllm") is None:
            raise DeltaRouterError("the vllm backend needs vLLM installed (on a GPU); use --backend peft")
        self.base, self.adapters = base, {k: Path(v) for k, v in adapters.items()}
        self.max_loaded, self.engine_options = max_loaded, engine_options
        self._hf = None

    def lora_request(self, adapter: str):
        """``LoRARequest`` for an adapter id; ``None`` for the base. Ids are stable across restarts."""
        if adapter == BASE_ADAPTER:
            return None
        from vllm.lora.request import LoRARequest

        lora_id = zlib.crc32(adapter.encode()) % (2**31 - 1) + 1  # vLLM wants a positive int
        return LoRARequest(adapter, lora_id, str(self.adapters[adapter]))

    @staticmethod
    def sampling_params(request: GenerationRequest):
        from vllm import SamplingParams

        return SamplingParams(
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop) or None,
            min_tokens=request.min_tokens,
        )

    def target(self, decision: RouteDecision) -> str:
        if not decision.adapters:
            return BASE_ADAPTER
        return max(zip(decision.weights, decision.adapters, strict=True))[1]

    @property
    def engine(self):
        if "_engine" not in self.__dict__:
            from vllm import LLM

            rank = max(_lora_rank(p) for p in self.adapters.values()) if self.adapters else 8
            self.__dict__["_engine"] = LLM(
                str(self.base.path), enable_lora=True, max_loras=self.max_loaded, max_lora_rank=rank,
                **self.engine_options,
            )  # fmt: skip
        return self.__dict__["_engine"]

    def decode_batch(self) -> VllmBatch:
        return VllmBatch(self.engine.llm_engine)

    def admit(self, batch: VllmBatch, request: GenerationRequest) -> None:
        batch.add(request, self.sampling_params(request), self.lora_request(request.adapter))

    # routing and limits use an HF copy of the base (CPU by default)
    @property
    def hf(self) -> PeftBackend:
        if self._hf is None:
            self._hf = PeftBackend(self.base, {}, max_loaded=1)
        return self._hf

    @property
    def max_context(self) -> int:
        return self.hf.max_context

    def count_tokens(self, text: str) -> int:
        return self.hf.count_tokens(text)

    def encoder(self, **options) -> QueryEncoder:
        return self.hf.encoder(**options)


class VllmBatch:
    """The requests running in vLLM's engine; ``step`` runs one engine step (vLLM batches them) and
    streams each request's new text as it is decoded."""

    def __init__(self, engine):
        self.engine = engine
        self.running: dict[str, tuple[GenerationRequest, str]] = {}  # request id -> (request, text so far)
        self._ids = iter(range(2**62))

    def __len__(self) -> int:
        return len(self.running)

    def requests(self) -> list[GenerationRequest]:
        return [request for request, _ in self.running.values()]

    def abort(self) -> None:
        """Take every running request out of vLLM's engine (after a failed step), so that they stop
        taking KV cache and steps."""
        if self.running:
            self.engine.abort_request(list(self.running))
        self.running.clear()

    def add(self, request: GenerationRequest, params, lora_request) -> None:
        request_id = f"dr-{next(self._ids)}"
        self.engine.add_request(request_id, request.prompt, params, lora_request=lora_request)
        self.running[request_id] = (request, "")

    def step(self) -> list[tuple[GenerationRequest, GenerationResult]]:
        finished = []
        for output in self.engine.step():
            request, seen = self.running[output.request_id]
            completion = output.outputs[0]
            if request.on_text and len(completion.text) > len(seen):
                request.on_text(completion.text[len(seen) :])
            self.running[output.request_id] = (request, completion.text)
            if output.finished:
                del self.running[output.request_id]
                reason = "length" if completion.finish_reason == "length" else "stop"
                n_prompt, n_out = len(output.prompt_token_ids), len(completion.token_ids)
                finished.append((request, GenerationResult(completion.text, n_prompt, n_out, reason)))
        return finished


def _lora_rank(path: Path) -> int:
    import json

    return int(json.loads((path / "adapter_config.json").read_text()).get("r", 8))


BACKENDS = {"peft": PeftBackend, "vllm": VllmBackend}
