"""Delta Activations: embed a finetune as the mean shift of its hidden state on probe prompts.

``delta(f) = mean_p ( h_f(p) - h_base(p) )`` with ``h`` the hidden state of ``layer`` (default: the
final, post-norm one) at the last non-pad token, in fp32.

How a finetune's activations are computed (``method``):

- ``"batched"`` (default): the base is loaded once and only the transformer body runs (no LM
  head). LoRA adapters are applied without touching the base weights, by forward hooks that add
  the low-rank update per group of rows (``delta_router.models.lora_batch``), so ``adapters_per_batch``
  adapters x all probes run in one padded forward. A full finetune is streamed into the live
  model tensor by tensor (one model in memory); the base is streamed back before the next adapter.
- ``"reference"``: PEFT's ``PeftModel.from_pretrained`` per adapter, one probe per forward, then
  ``unload()``. Slower; the baseline of ``benchmarks/embed_throughput.py`` and the fallback for
  adapters that are more than low-rank updates (DoRA, modules_to_save, ...).
"""

from __future__ import annotations

import hashlib
import json
import logging
import reprlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from delta_router import checks
from delta_router.data.sequences import clip_text
from delta_router.embedding.probes import ProbeSet
from delta_router.embedding.vectors import unit_rows
from delta_router.errors import (
    DataError,
    IncompatibleBaseError,
    InvalidModelError,
    ProbeError,
    SpaceMismatchError,
)
from delta_router.home import atomic_write_bytes, cache_dir
from delta_router.models.base import DEFAULT_BASE, BaseFingerprint, BaseLM, resolve_base, resolve_device
from delta_router.models.finetunes import Finetune, LoraFactors, iter_full_weights, load_lora_factors
from delta_router.models.lora_batch import lora_hooks
from delta_router.serialize import from_json, to_json

logger = logging.getLogger(__name__)

POOLINGS = ("last", "mean")
NORMALIZATIONS = ("none", "probe")
METHODS = ("batched", "reference")


@dataclass(frozen=True)
class EmbeddingSpace:
    """Everything that must match for two embeddings to be comparable.

    ``base_name`` and ``probe_set`` are labels for messages; equality uses the fingerprints.
    ``probe_texts`` are the probes themselves, so an index built with a probe file can be searched
    without that file (empty in spaces written before they were stored).
    """

    base: BaseFingerprint
    probes: str  # ProbeSet.fingerprint
    layer: int
    pooling: str
    normalize: str
    dim: int
    base_name: str = field(default="", compare=False)
    probe_set: str = field(default="", compare=False)
    probe_texts: tuple[str, ...] = field(default=(), compare=False)

    @property
    def probe_spec(self) -> ProbeSet | str:
        """The probes of this space: the stored texts, else the probe set's name."""
        return ProbeSet(self.probe_set, self.probe_texts) if self.probe_texts else self.probe_set

    @property
    def key(self) -> str:
        """Short hash of the compared fields: names cache directories."""
        parts = [self.base.id, self.probes, self.layer, self.pooling, self.normalize, self.dim]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"base {self.base_name or '?'} [{self.base.id}], probes {self.probe_set or '?'} "
            f"[{self.probes}], layer {self.layer}, pooling {self.pooling}, "
            f"normalize {self.normalize}, dim {self.dim}"
        )

    def check_same(self, other: EmbeddingSpace, this: str, that: str) -> None:
        """Raise SpaceMismatchError naming both spaces unless ``other == self``."""
        if other != self:
            raise SpaceMismatchError(
                f"cannot compare embeddings from different spaces:\n  {this}: {self.describe()}"
                f"\n  {that}: {other.describe()}\nRe-embed with the same base and probe settings."
            )

    def to_dict(self) -> dict:
        return to_json(self)

    @classmethod
    def from_dict(cls, data: dict) -> EmbeddingSpace:
        return from_json(cls, data)


@dataclass
class Embedding:
    """One finetune's Delta Activations vector (float32, shape ``[dim]``) and where it came from."""

    vector: np.ndarray
    model_id: str
    path: str
    kind: str  # "lora" or "full"
    content_hash: str
    space: EmbeddingSpace
    created: str  # ISO-8601 UTC time the vector was computed

    def to_dict(self, with_vector: bool = True) -> dict:
        """``to_json`` in the layout indexes store: ``space``, then ``vector`` (if ``with_vector``), last."""
        data = to_json(replace(self, vector=None))
        data["space"] = data.pop("space")
        del data["vector"]
        if with_vector:
            data["vector"] = self.vector.tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict, vector: np.ndarray | None = None) -> Embedding:
        """``from_json``; ``vector``, if given, is taken instead of the record's (indexes store it apart)."""
        return from_json(cls, data, known=None if vector is None else {"vector": vector})


def pooled_hidden_states(
    body: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: int = -1,
    pooling: str = "last",
) -> torch.Tensor:
    """Hidden state ``hidden_states[layer]`` of the transformer body, pooled per row: ``[B, d]`` fp32.

    Position ids follow the attention mask, so left and right padding give the same result.
    """
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
        output_hidden_states=layer != -1,
    )
    out = body(**kwargs)
    hidden = (out.last_hidden_state if layer == -1 else out.hidden_states[layer]).float()
    if pooling == "last":
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def encode_texts(
    body: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    layer: int = -1,
    pooling: str = "last",
    max_length: int = 2048,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Pooled hidden states of raw ``texts``, ``batch_size`` per padded forward: ``[N, d]`` fp32 on CPU.

    Texts are cut to ``max_length`` tokens; ``device`` defaults to the body's. The one batched text
    encoder: the selector's query activations (``DeltaEmbedder.text_activations``), the embedder's
    reference path and the router's ``QueryEncoder`` all call it, so a text pooled for a router
    profile and for a selection is tokenised, truncated and pooled the same way.
    """
    texts = checks.texts(texts)
    device = device or next(body.parameters()).device
    rows = []
    for start in range(0, len(texts), batch_size):
        chunk = [clip_text(t, max_length) for t in texts[start : start + batch_size]]
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        for i in (mask.sum(1) == 0).nonzero().flatten().tolist():
            text = texts[start + i]
            raise DataError(f"text {start + i} ({reprlib.repr(text)}) has no tokens: nothing to encode")
        with torch.inference_mode():
            rows.append(pooled_hidden_states(body, ids, mask, layer, pooling).cpu())
    return torch.cat(rows)


def _read_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """A cached float32 array of ``shape``, or None when there is none or it is unreadable (then it
    is recomputed and rewritten: a truncated or hand-edited cache file costs a recompute, not a run)."""
    if not path.exists():
        return None
    try:
        array = np.load(path)
    except (OSError, ValueError, EOFError) as exc:
        logger.warning("%s: unreadable cache entry (%s): recomputing it", path, exc)
        return None
    if array.dtype != np.float32 or array.shape != shape:
        logger.warning("%s: cache entry of %s %s, not float32 %s: recomputing it", path, array.dtype,
                       array.shape, shape)  # fmt: skip
        return None
    return array


def delta_vector(finetuned: torch.Tensor, base_acts: torch.Tensor, normalize: str = "none") -> np.ndarray:
    """Mean over probes of ``finetuned - base_acts`` (both ``[P, d]``); ``"probe"``: unit rows first."""
    diff = (finetuned - base_acts).cpu().numpy().astype(np.float32)
    return (unit_rows(diff) if normalize == "probe" else diff).mean(0)


class LiveModel:
    """The base model embedders run, loaded on first use, with what its weights are now.

    ``state`` is "base", a full finetune's content hash (its weights are swapped in), or "dirty".
    A thread that runs or changes the model (LoRA hooks, swapped weights, PEFT) holds ``lock``.
    Embedders of one base with other settings can share one (``DeltaEmbedder(..., live=...)``), so
    a process holds one copy of the base, not one per probe set.
    """

    def __init__(self, base: BaseLM, device: torch.device) -> None:
        self.base, self.device = base, device
        self.lock = threading.RLock()
        self.state = "base"
        self._model: torch.nn.Module | None = None

    @property
    def model(self) -> torch.nn.Module:
        """The base causal LM in fp32 eval mode, no gradients."""
        if self._model is None:
            logger.info("loading base %s", self.base.describe())
            self._model = self.base.load_model(torch.float32, self.device).requires_grad_(False)
        return self._model

    def reset(self) -> None:
        """Drop the model (PEFT may have changed it before failing): a clean base is loaded next."""
        self._model, self.state = None, "base"


class DeltaEmbedder:
    """Embeds finetunes (LoRA adapter or full-model directories) of one base model.

    >>> embedder = DeltaEmbedder("smollm2-135m")
    >>> [e.vector.shape for e in embedder.embed(["adapters/math-1", "adapters/law-1"])]
    [(576,), (576,)]
    """

    def __init__(
        self,
        base: str | Path | BaseLM = DEFAULT_BASE,
        probes: str | Path | Sequence[str] | ProbeSet = "paper",
        layer: int = -1,
        pooling: str = "last",
        normalize: str = "none",
        method: str = "batched",
        adapters_per_batch: int | None = None,
        device: str | torch.device = "cpu",
        cache: bool = True,
        progress: bool = True,
        live: LiveModel | None = None,
    ) -> None:
        """``live``: another embedder's ``live`` model (same base and device) to run instead of
        loading one more copy of the base."""
        for name, value, allowed in (
            ("pooling", pooling, POOLINGS),
            ("normalize", normalize, NORMALIZATIONS),
            ("method", method, METHODS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.base = resolve_base(base)
        self.probes = ProbeSet.resolve(probes)
        n_layers = self.base.fingerprint.num_layers
        if not -1 <= layer <= n_layers:
            raise ValueError(f"layer must be -1 or 0..{n_layers} for this base, got {layer}")
        self.layer, self.pooling, self.normalize, self.method = layer, pooling, normalize, method
        self.device = resolve_device(device)
        # adapters sharing one forward: 16 on CPU (1.44x the compute floor, +350 MB over 4;
        # benchmarks/RESULTS.md), GPUs want more
        default_batch = 16 if self.device.type == "cpu" else 32
        self.adapters_per_batch = checks.count(adapters_per_batch or default_batch, "adapters_per_batch")
        self.cache, self.progress = cache, progress
        if live is not None and (live.base.fingerprint, live.device) != (self.base.fingerprint, self.device):
            raise ValueError(f"a shared live model must be of base {self.base.describe()} on {self.device}")
        self.live = live or LiveModel(self.base, self.device)

    @classmethod
    def for_space(cls, space: EmbeddingSpace, **options) -> DeltaEmbedder:
        """An embedder whose vectors land in ``space`` (e.g. an index's); refuses if they cannot."""
        embedder = cls(
            base=space.base_name,
            probes=space.probe_spec,
            layer=space.layer,
            pooling=space.pooling,
            normalize=space.normalize,
            **options,
        )
        space.check_same(embedder.space, "the index", "this embedder")
        return embedder

    # ---- spaces and caches -------------------------------------------------------------------
    @cached_property
    def space(self) -> EmbeddingSpace:
        fp = self.base.fingerprint
        return EmbeddingSpace(
            base=fp, probes=self.probes.fingerprint, layer=self.layer, pooling=self.pooling,
            normalize=self.normalize, dim=fp.hidden_size, base_name=self.base.name,
            probe_set=self.probes.name, probe_texts=self.probes.texts,
        )  # fmt: skip

    def _cache_file(self, content_hash: str) -> Path:
        return cache_dir("embeddings", self.space.key) / f"{content_hash}.npy"

    # ---- the live model ------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The base causal LM (``LiveModel``), loaded once, in fp32 eval mode."""
        return self.live.model

    @property
    def _model_lock(self) -> threading.RLock:
        return self.live.lock

    @cached_property
    def tokenizer(self):
        return self.base.load_tokenizer()

    @cached_property
    def max_tokens(self) -> int:
        """Longest text the base reads (its context length); longer texts are truncated."""
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    @property
    def body(self) -> torch.nn.Module:
        """The transformer body (embeddings, blocks, final norm): no LM head."""
        return self.model.base_model

    @cached_property
    def _body_prefix(self) -> str:
        return self.model.base_model_prefix + "."

    @cached_property
    def probe_batch(self) -> dict[str, torch.Tensor]:
        """All probes tokenized in one padded batch: ``input_ids``/``attention_mask`` ``[P, T]``."""
        batch = self.tokenizer(list(self.probes.texts), padding=True, return_tensors="pt")
        for i in (batch["attention_mask"].sum(1) == 0).nonzero().flatten().tolist():
            raise ProbeError(
                f"probe {i} of {self.probes.name!r} has no tokens with the tokenizer of base "
                f"{self.base.name!r} ({self.base.path}): does that directory hold its tokenizer files?"
            )
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def _forward(self, groups: int = 1) -> torch.Tensor:
        """Pooled activations of ``groups`` copies of the probe batch: ``[groups * P, d]``."""
        batch = {k: v.repeat(groups, 1) for k, v in self.probe_batch.items()}
        with torch.inference_mode():
            return pooled_hidden_states(self.body, **batch, layer=self.layer, pooling=self.pooling)

    def _load_weights(self, tensors: Iterable[tuple[str, torch.Tensor]], label: str) -> None:
        """Copy named tensors into the live model in place (streaming; one tensor at a time)."""
        params = dict(self.model.named_parameters())
        seen = set()
        self.live.state = "dirty"
        with torch.no_grad():
            for name, tensor in tensors:
                if name not in params:
                    continue
                if params[name].shape != tensor.shape:
                    raise IncompatibleBaseError(
                        f"{label}: tensor {name} has shape {tuple(tensor.shape)}, the base "
                        f"{self.base.describe()} has {tuple(params[name].shape)}"
                    )
                params[name].copy_(tensor)
                seen.add(name)
        missing = [n for n in params if n.startswith(self._body_prefix) and n not in seen]
        if missing:
            raise InvalidModelError(f"{label}: missing {len(missing)} tensors, e.g. {missing[0]}")

    def _ensure_base(self) -> None:
        if self.live.state != "base":
            base_ft = Finetune(self.base.path, "full", self.base.name)
            self._load_weights(iter_full_weights(base_ft, self.base), f"base {self.base.name}")
            self.live.state = "base"

    # ---- activations ---------------------------------------------------------------------------
    def base_activations(self) -> torch.Tensor:
        """Pooled base activations on the probes, ``[P, d]`` fp32; computed once, cached on disk."""
        with self._model_lock:
            return self._base_activations()

    def _base_activations(self) -> torch.Tensor:
        if "_base_acts" not in self.__dict__:
            path = cache_dir("activations") / f"{self.space.key}.npy"
            shape = (len(self.probes), self.space.dim)
            stored = _read_cached(path, shape) if self.cache else None
            if stored is not None:
                acts = torch.from_numpy(stored)
            else:
                self._ensure_base()
                acts = self._forward().cpu()
                if self.cache:
                    atomic_write_bytes(path, _npy_bytes(acts.numpy()))
            self.__dict__["_base_acts"] = acts
        return self.__dict__["_base_acts"]

    def text_activations(self, texts: Sequence[str], batch_size: int = 8) -> torch.Tensor:
        """The base's pooled activations on arbitrary texts (same layer/pooling): ``[N, d]`` fp32."""
        with self._model_lock:
            self._ensure_base()
            options = (self.layer, self.pooling, self.max_tokens, batch_size, self.device)
            return encode_texts(self.body, self.tokenizer, texts, *options)

    def activations(self, finetunes: Sequence[Finetune]) -> list[torch.Tensor]:
        """Pooled activations on the probes, ``[P, d]`` fp32 each, for a chunk of finetunes.

        Plain LoRA adapters share one forward; full finetunes and adapters that need PEFT
        (DoRA, ...) run one at a time. Thread-safe: one thread at a time runs the live model.
        """
        with self._model_lock:
            return self._activations(finetunes)

    def _activations(self, finetunes: Sequence[Finetune]) -> list[torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        plain: list[tuple[int, LoraFactors]] = []
        for i, ft in enumerate(finetunes):
            if ft.kind == "full":
                self._load_weights(iter_full_weights(ft, self.base), str(ft.path))
                self.live.state = ft.content_hash
                out[i] = self._forward().cpu()
                continue
            self._ensure_base()
            lora = load_lora_factors(ft, self.model, self.base)
            if self.method == "batched" and lora.plain:
                plain.append((i, lora))
                continue
            if self.method == "batched":
                logger.warning("%s: adapter needs PEFT itself; using the reference path", ft.path)
            out[i] = self._reference_activations(ft)
        if plain:
            self._ensure_base()
            with lora_hooks(self.model, [lora for _, lora in plain]):
                rows = self._forward(groups=len(plain)).cpu()
            for (i, _), acts in zip(plain, rows.split(len(self.probes)), strict=True):
                out[i] = acts
        return [out[i] for i in range(len(finetunes))]

    def _reference_activations(self, finetune: Finetune) -> torch.Tensor:
        """PEFT's path: attach the adapter, one probe per forward, unload."""
        from peft import PeftModel

        try:
            peft_model = PeftModel.from_pretrained(self.model, str(finetune.path))
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, RuntimeError) as exc:
            self.live.reset()  # PEFT may have changed the model before it failed
            raise InvalidModelError(f"{finetune.path}: PEFT cannot load this adapter ({exc})") from exc
        try:
            peft_model.eval()
            options = (self.layer, self.pooling, self.max_tokens, 1, self.device)
            return encode_texts(self.body, self.tokenizer, self.probes.texts, *options)
        finally:
            peft_model.unload()

    # ---- public API ----------------------------------------------------------------------------
    def embed_one(self, source: str | Path | Finetune, model_id: str | None = None) -> Embedding:
        return self.embed([source], [model_id] if model_id else None)[0]

    def embed(
        self,
        sources: Sequence[str | Path | Finetune],
        model_ids: Sequence[str] | None = None,
    ) -> list[Embedding]:
        """Embed finetunes, in input order. Unchanged finetunes come from the cache for free.

        All paths are opened and checked before any compute; LoRA adapters run before full
        finetunes so the base weights are streamed back at most once.
        """
        sources = checks.sources(sources)
        if model_ids is not None and len(model_ids) != len(sources):
            raise ValueError(f"{len(model_ids)} model ids for {len(sources)} sources")
        finetunes = [
            s if isinstance(s, Finetune) else Finetune.open(s, model_ids[i] if model_ids else None)
            for i, s in enumerate(sources)
        ]
        results: dict[int, Embedding] = {}
        todo = []
        for i, ft in enumerate(finetunes):
            cached = self._cache_file(ft.content_hash)
            stored = _read_cached(cached, (self.space.dim,)) if self.cache else None
            if stored is not None:
                results[i] = self._record(ft, stored, cached)
            else:
                todo.append(i)
        todo.sort(key=lambda i: finetunes[i].kind == "full")
        if todo:
            base_acts = self.base_activations()
            size = self.adapters_per_batch
            with tqdm(total=len(todo), desc="embedding", unit="model",
                      disable=not self.progress) as bar:  # fmt: skip
                for start in range(0, len(todo), size):
                    chunk = todo[start : start + size]
                    acts = self.activations([finetunes[i] for i in chunk])
                    for i, ft_acts in zip(chunk, acts, strict=True):
                        ft = finetunes[i]
                        vector = delta_vector(ft_acts, base_acts, self.normalize)
                        cached = self._cache_file(ft.content_hash)
                        if self.cache:
                            atomic_write_bytes(cached, _npy_bytes(vector))
                        results[i] = self._record(ft, vector, cached if self.cache else None)
                    bar.update(len(chunk))
        return [results[i] for i in range(len(finetunes))]

    def transform(self, sources: Sequence[str | Path | Finetune]) -> np.ndarray:
        """Embedding vectors stacked: ``[N, dim]`` float32."""
        return np.stack([e.vector for e in self.embed(sources)])

    def _record(self, ft: Finetune, vector: np.ndarray, cached: Path | None) -> Embedding:
        when = datetime.fromtimestamp(cached.stat().st_mtime, timezone.utc) if cached else None
        return Embedding(
            vector=np.asarray(vector, dtype=np.float32), model_id=ft.model_id,
            path=str(ft.path.resolve()), kind=ft.kind, content_hash=ft.content_hash,
            space=self.space, created=(when or datetime.now(timezone.utc)).isoformat(),
        )  # fmt: skip


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
