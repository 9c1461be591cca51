"""Finetunes of a base: PEFT LoRA adapter directories and full HF model directories.

``Finetune.open`` tells them apart and hashes their content; ``load_lora_factors`` reads an
adapter's low-rank factors and checks every shape against the base, so an adapter trained on
another base fails here with a message naming both bases.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from delta_router.errors import IncompatibleBaseError, InvalidModelError
from delta_router.home import sha256_files
from delta_router.model_ids import check_model_id, id_from_name
from delta_router.models.base import BaseLM, read_config, safetensors_files, shape_signature

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclass
class Finetune:
    """A finetune on disk. ``kind`` is ``"lora"`` (PEFT adapter) or ``"full"`` (HF model)."""

    path: Path
    kind: Literal["lora", "full"]
    model_id: str

    @classmethod
    def open(cls, path: str | Path, model_id: str | None = None) -> Finetune:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise InvalidModelError(f"{path}: not a directory (expected a PEFT adapter or HF model)")
        model_id = id_from_name(path.resolve().name) if model_id is None else check_model_id(model_id)
        if (path / ADAPTER_CONFIG).exists():
            if not (path / ADAPTER_WEIGHTS).exists():
                raise InvalidModelError(
                    f"{path}: adapter has no {ADAPTER_WEIGHTS} (re-save it with "
                    "save_pretrained(..., safe_serialization=True))"
                )
            finetune = cls(path, "lora", model_id)
            peft_type = finetune.adapter_config.get("peft_type", "LORA")
            if peft_type != "LORA":  # IA3, LOHA, LOKR, PREFIX_TUNING, ...: no low-rank delta to read
                raise InvalidModelError(
                    f"{path / ADAPTER_CONFIG}: peft_type {reprlib.repr(peft_type)} is not supported; "
                    "delta-router reads LoRA adapters (LORA, with DoRA and rsLoRA) and full models"
                )
            return finetune
        if (path / "config.json").exists() and safetensors_files(path):
            return cls(path, "full", model_id)
        raise InvalidModelError(
            f"{path}: not a PEFT adapter ({ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}) "
            "nor an HF model directory (config.json + *.safetensors)"
        )

    @cached_property
    def files(self) -> list[Path]:
        if self.kind == "lora":
            return [self.path / ADAPTER_CONFIG, self.path / ADAPTER_WEIGHTS]
        return [self.path / "config.json", *safetensors_files(self.path)]

    @cached_property
    def content_hash(self) -> str:
        """sha256 over the config and weight files: equal hashes mean equal finetunes."""
        return sha256_files(self.files)

    @cached_property
    def adapter_config(self) -> dict:
        path = self.path / ADAPTER_CONFIG
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            json.dumps(config, ensure_ascii=False).encode("utf-8")  # no lone surrogates ("\ud800")
        except (ValueError, RecursionError) as exc:  # bad UTF-8, JSON or Unicode; too deep; too many digits
            raise InvalidModelError(f"{path}: corrupt JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise InvalidModelError(
                f"{path}: corrupt JSON (a JSON object is expected, got {type(config).__name__})"
            )
        return config

    @property
    def claimed_base(self) -> str:
        """The base the finetune says it was trained from (may be empty or a stale path)."""
        if self.kind == "lora":
            return str(self.adapter_config.get("base_model_name_or_path") or "?")
        return str(read_config(self.path).get("_name_or_path") or "?")


@dataclass
class LoraFactors:
    """Low-rank updates of one adapter: ``delta W[name] = scale * B @ A``.

    ``factors[name] = (A [r, in], B [out, r], scale)``; names are module names of the causal LM.
    ``plain`` is False when the adapter uses more than low-rank updates of Linear layers
    (DoRA, modules_to_save, per-module alpha, biases, embedding LoRA, fan_in_fan_out); such
    adapters need PEFT itself.
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    plain: bool


PEFT_ONLY_OPTIONS = ("use_dora", "modules_to_save", "alpha_pattern", "fan_in_fan_out")


def peft_only_options(adapter_config: dict) -> list[str]:
    """The options of an adapter config that need PEFT's own layers (no plain ``scale * B @ A``)."""
    return [option for option in PEFT_ONLY_OPTIONS if adapter_config.get(option)]


def load_lora_factors(finetune: Finetune, model: torch.nn.Module, base: BaseLM) -> LoraFactors:
    """Read and validate an adapter against the live base ``model`` (a causal LM)."""
    cfg = finetune.adapter_config  # its peft_type was checked by Finetune.open
    _check_config_values(finetune.path / ADAPTER_CONFIG, cfg)
    weights_file = finetune.path / ADAPTER_WEIGHTS
    try:
        with safe_open(str(weights_file), framework="pt") as fh:
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # safetensors raises its own error type for corrupt headers
        raise InvalidModelError(f"{weights_file}: corrupt safetensors file ({exc})") from exc

    plain = not peft_only_options(cfg)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        for part in ("lora_A", "lora_B"):
            module_name, marker, param = name.partition(f".{part}.")
            if marker and param.rpartition(".")[2] == "weight":  # not lora_B.bias (lora_bias)
                if tensor.dim() != 2:
                    raise InvalidModelError(
                        f"{weights_file}: {key} has shape {tuple(tensor.shape)}; a LoRA factor is a matrix"
                    )
                pairs.setdefault(module_name, {})[part] = tensor
                break
        else:
            plain = False  # biases, DoRA magnitudes, embedding LoRA, saved modules
    if not pairs:
        raise InvalidModelError(f"{weights_file}: no lora_A/lora_B tensors found")

    _check_config_describes_weights(finetune, cfg, pairs)
    for saved in cfg.get("modules_to_save") or []:  # PEFT loads these modules' weights from the file
        for module_name, module in model.named_modules(remove_duplicate=False):
            if not module_name.endswith(saved):  # PEFT's match (peft.utils.other._set_trainable)
                continue
            for param, _ in module.named_parameters():
                if f"{PEFT_PREFIX}{module_name}.{param}" not in tensors:
                    raise InvalidModelError(
                        f"{weights_file}: modules_to_save names {saved!r}, but the file has no "
                        f"{PEFT_PREFIX}{module_name}.{param}; re-save the adapter"
                    )
    modules = dict(model.named_modules())
    alpha = float(cfg.get("lora_alpha", 8))
    factors = {}
    for module_name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise InvalidModelError(f"{weights_file}: {module_name} lacks lora_A or lora_B")
        a, b = pair["lora_A"].to(torch.float32), pair["lora_B"].to(torch.float32)
        module = modules.get(module_name)
        weight = getattr(module, "weight", None)
        if module is None or weight is None or weight.dim() != 2:
            _incompatible(finetune, base, f"the base has no linear module {module_name!r}")
        if not isinstance(module, torch.nn.Linear):
            plain = False
        out_features, in_features = weight.shape
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_features or b.shape[0] != out_features:
            _incompatible(
                finetune,
                base,
                f"{module_name} is {out_features}x{in_features} in the base, but the adapter's "
                f"factors are A {tuple(a.shape)} and B {tuple(b.shape)}",
            )
        rank = a.shape[0]
        scale = alpha / (math.sqrt(rank) if cfg.get("use_rslora") else rank)
        factors[module_name] = (a, b, scale)
    return LoraFactors(factors, plain)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return _is_int(value) and value > 0


def _is_number(value: object) -> bool:
    """A finite number that converts to a float (JSON integers have no size limit)."""
    if not (_is_int(value) or isinstance(value, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_names(value: object, allow_str: bool = True) -> bool:
    """A list of strings (or, with ``allow_str``, one string: a regular expression)."""
    if isinstance(value, str):
        return allow_str
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


# init_lora_weights values PEFT accepts (peft.tuners.lora.layer.LoraLayer.update_layer)
_PEFT_INITS = re.compile(r"(?i:gaussian|olora)|pissa(_niter_[0-9]{1,9})?|orthogonal|eva|loftq|lora_ga|mica")
# the fields of adapter_config.json read here or by PEFT's module matching: (check, what PEFT writes)
_CONFIG_FIELDS = {
    "r": (_is_positive_int, "a positive integer"),
    "lora_alpha": (_is_number, "a number"),
    "target_modules": (_is_names, "a list of module names or a regular expression"),
    "exclude_modules": (lambda v: v is None or _is_names(v), "null, a list of module names or a regex"),
    "modules_to_save": (lambda v: v is None or _is_names(v, allow_str=False), "null or a list of names"),
    "layers_to_transform": (
        lambda v: v is None or _is_int(v) or (isinstance(v, list) and all(map(_is_int, v))),
        "null, a layer index or a list of them",
    ),
    "layers_pattern": (lambda v: v is None or _is_names(v), "null, a name or a list of names"),
    "rank_pattern": (
        lambda v: v is None or (isinstance(v, dict) and all(map(_is_positive_int, v.values()))),
        "an object mapping module patterns to positive integers",
    ),
    "alpha_pattern": (
        lambda v: v is None or (isinstance(v, dict) and all(map(_is_number, v.values()))),
        "an object mapping module patterns to numbers",
    ),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    # read by PEFT when it builds a layer (the reference path)
    "bias": (lambda v: v in ("none", "all", "lora_only"), '"none", "all" or "lora_only"'),
    "lora_bias": (lambda v: isinstance(v, bool), "true or false"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v <= 1, "a probability"),
    "init_lora_weights": (
        lambda v: isinstance(v, bool) or (isinstance(v, str) and _PEFT_INITS.fullmatch(v) is not None),
        "true, false or an initialisation PEFT runs when it loads an adapter (not corda: it needs data)",
    ),
}  # fmt: skip
# the regular expressions PEFT builds from the config's names (peft.utils.other.get_pattern_key,
# peft.tuners.tuners_utils.check_target_module_exists)
_PATTERN_FORMS = {
    "target_modules": "{}",
    "exclude_modules": "{}",
    "modules_to_save": r"(^|.*\.){}($|\..*)",
    "layers_pattern": r"(?:^|.*?\.){}\.(?P<idx>\d+)\.",
    "rank_pattern": r"(.*\.)?({})$",
    "alpha_pattern": r"(.*\.)?({})$",
}


def _check_config_values(path: Path, cfg: dict) -> None:
    """Each field PEFT's loading depends on has the type PEFT writes (JSON allows any value)."""
    if "target_modules" not in cfg:
        raise InvalidModelError(
            f"{path}: no target_modules (PEFT saves the names of the adapted modules there)"
        )
    for name, (valid, expected) in _CONFIG_FIELDS.items():
        if name in cfg and not valid(cfg[name]):
            raise InvalidModelError(f"{path}: {name} is {reprlib.repr(cfg[name])}; expected {expected}")
    for name, form in _PATTERN_FORMS.items():
        names = cfg.get(name) or ()
        if name == "target_modules" and names == "all-linear":
            continue
        for pattern in [names] if isinstance(names, str) else names:  # a list's items, a dict's keys
            try:
                re.compile(form.format(pattern))
            except re.error as exc:
                raise InvalidModelError(
                    f"{path}: {name} holds {reprlib.repr(pattern)}, not a valid regular expression ({exc})"
                ) from exc


def _check_config_describes_weights(finetune: Finetune, cfg: dict, pairs: dict[str, dict]) -> None:
    """PEFT loads an adapter by its config: each weight's module must be targeted, at the config's rank.

    An adapter whose config contradicts its weights would embed fine and then fail in every request
    that loads it through PEFT (``size mismatch``), so it is refused where it enters.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from peft.utils.other import get_pattern_key

    path = finetune.path / ADAPTER_CONFIG
    known = LoraConfig.__dataclass_fields__
    try:
        config = LoraConfig(**{k: v for k, v in cfg.items() if k in known and k != "peft_type"})
    except (TypeError, ValueError) as exc:
        raise InvalidModelError(f"{path}: not a valid LoRA config ({exc})") from exc
    all_linear = config.target_modules == "all-linear"
    rank_pattern = config.rank_pattern or {}
    for module_name, pair in sorted(pairs.items()):
        if not (all_linear or check_target_module_exists(config, module_name)):
            raise InvalidModelError(
                f"{path}: the weights hold {module_name!r}, which target_modules {config.target_modules!r} "
                "does not name; PEFT would drop it. Fix target_modules or re-save the adapter"
            )
        rank = rank_pattern.get(get_pattern_key(rank_pattern, module_name), config.r)
        if "lora_A" in pair and pair["lora_A"].shape[0] != rank:
            raise InvalidModelError(
                f"{path}: r={rank} for {module_name!r}, but its lora_A has rank {pair['lora_A'].shape[0]}; "
                "fix r (or rank_pattern) or re-save the adapter"
            )


def check_fits(finetune: Finetune, base: BaseLM) -> None:
    """Refuse (``IncompatibleBaseError``, ``InvalidModelError``) a finetune that does not fit ``base``:
    a full model of other shapes, or a LoRA whose factors do not match the base's modules. Cheap:
    no weights of the base are loaded (its modules are built on the meta device)."""
    if finetune.kind == "full":
        _check_full_shapes(finetune, base)
    else:
        load_lora_factors(finetune, base.meta_model, base)


def _check_full_shapes(finetune: Finetune, base: BaseLM) -> None:
    mine, theirs = shape_signature(read_config(finetune.path)), shape_signature(base.config)
    if mine != theirs:
        _incompatible(
            finetune,
            base,
            "architecture/hidden/layers/vocab are "
            f"{'/'.join(map(str, mine))} vs the base's {'/'.join(map(str, theirs))}",
        )


def iter_full_weights(finetune: Finetune, base: BaseLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream ``(name, tensor)`` of a full finetune, one tensor at a time, after a shape check."""
    _check_full_shapes(finetune, base)
    for file in safetensors_files(finetune.path):
        try:
            with safe_open(str(file), framework="pt") as fh:
                for key in fh.keys():
                    yield key, fh.get_tensor(key)
        except Exception as exc:
            raise InvalidModelError(f"{file}: corrupt safetensors file ({exc})") from exc


def fold_lora(model: torch.nn.Module, adapter_dir: str | Path) -> torch.nn.Module:
    """``model`` with the LoRA adapter at ``adapter_dir`` folded into its weights (in place), eval mode.

    The one way a LoRA becomes a full model (``load_for_eval``, ``merging.materialize``,
    ``testing.merge_adapter``): PEFT's ``merge_and_unload``, which knows every adapter variant PEFT
    loads (DoRA, rank patterns, ...), so a folded model is the one PEFT would serve.
    """
    from peft import PeftModel
    from safetensors import SafetensorError

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    except SafetensorError as exc:
        weights = Path(adapter_dir) / ADAPTER_WEIGHTS
        raise InvalidModelError(f"{weights}: corrupt safetensors file ({exc})") from exc
    return peft_model.merge_and_unload().eval()


def _incompatible(finetune: Finetune, base: BaseLM, detail: str) -> None:
    raise IncompatibleBaseError(
        f"{finetune.kind} finetune {finetune.model_id!r} at {finetune.path} (trained on "
        f"{finetune.claimed_base!r}) does not fit the base {base.describe()}: {detail}"
    )
