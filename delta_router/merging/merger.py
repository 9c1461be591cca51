"""``Merger``: merge selected finetunes into one model with mergekit, from a YAML recipe.

A recipe (``merge_recipes/<name>.yaml``, or any YAML path) is a mergekit configuration without
its model list: ``per_model`` holds the parameters every selected model gets (``"{weight}"`` is
replaced by its weight) and ``"{base}"`` by the base model's directory. LoRA candidates are first
materialised once into full models under ``$DELTA_ROUTER_HOME/materialized/<content hash>`` (one
base-sized copy per adapter, ~0.5 GB for SmolLM2 in fp32; written atomically), then everything is
plain mergekit. The output directory (written to a temp dir and renamed) is a loadable HF model
with ``delta_router.json`` (provenance) and mergekit's model card.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from unittest import mock

import torch
import yaml

from delta_router.errors import MergeError
from delta_router.home import atomic_directory, atomic_write_text, cache_dir, refuse_existing
from delta_router.models.base import DEFAULT_BASE, BaseLM, resolve_base
from delta_router.models.finetunes import Finetune, fold_lora
from delta_router.versions import package_versions

logger = logging.getLogger(__name__)

# The recipes: the repository's top-level merge_recipes/, installed as delta_router.merge_recipes
# (pyproject.toml maps it), so they are found the same way in a checkout and from a wheel.
RECIPE_DIR = Path(str(resources.files("delta_router.merge_recipes")))
# Recipes with a PEFT ``add_weighted_adapter`` counterpart (output stays a small LoRA adapter).
# "cat" stacks the weighted factors, so the merged delta is exactly sum_i w_i B_i A_i. The "*_svd"
# combinations apply TIES / DARE-TIES to the full deltas B_i A_i, exactly as mergekit does, then
# factor the result back with a truncated SVD. (PEFT's plain "ties" would trim and sign-elect the A
# and B factors separately, which is not TIES of the deltas.)
PEFT_COMBINATIONS = {
    "linear": "cat",
    "task_arithmetic": "cat",
    "ties": "ties_svd",
    "dare_ties": "dare_ties_svd",
}
PROVENANCE_FILE = "delta_router.json"
WEIGHTINGS = ("uniform", "score")


@dataclass(frozen=True)
class MergeRecipe:
    """A mergekit configuration template (see module docstring)."""

    name: str
    template: dict
    source: str

    @classmethod
    def load(cls, name_or_path: str | Path) -> MergeRecipe:
        path = Path(name_or_path)
        if not path.suffix:
            path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            known = ", ".join(available_recipes())
            raise MergeError(f"no merge recipe {name_or_path!r}: give a YAML path or one of {known}")
        try:
            template = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise MergeError(f"{path}: not valid YAML ({exc})") from exc
        if not isinstance(template, dict) or "merge_method" not in template:
            raise MergeError(f"{path}: a recipe is a YAML mapping with at least merge_method")
        return cls(path.stem, template, str(path))

    @property
    def method(self) -> str:
        return self.template["merge_method"]

    def with_parameters(self, **parameters) -> MergeRecipe:
        """This recipe with its global ``parameters`` updated (e.g. ``normalize=False``)."""
        template = {**self.template, "parameters": {**self.template.get("parameters", {}), **parameters}}
        options = ", ".join(f"{k}={v}" for k, v in sorted(parameters.items()))
        return MergeRecipe(self.name, template, f"{self.source} ({options})")

    @property
    def adapter_combination(self) -> str:
        """PEFT's ``combination_type`` for this recipe's adapter merge; MergeError if it has none."""
        if self.method not in PEFT_COMBINATIONS:
            raise MergeError(
                f"recipe {self.name} ({self.method}) has no PEFT adapter counterpart; "
                f"use one of {sorted(PEFT_COMBINATIONS)} or merge into a full model"
            )
        return PEFT_COMBINATIONS[self.method]

    def render(self, base_dir: str | Path, models: Sequence[tuple[str | Path, float]]) -> dict:
        """The mergekit configuration for ``models`` (path, weight) on ``base_dir``."""
        per_model = self.template.get("per_model", {})

        def fill(value, weight=None):
            if value == "{base}":
                return str(base_dir)
            if value == "{weight}":
                return weight
            if isinstance(value, dict):
                return {k: fill(v, weight) for k, v in value.items()}
            return value

        config = {k: fill(v) for k, v in self.template.items() if k != "per_model"}
        config["models"] = [
            {"model": str(path), "parameters": fill(per_model, float(weight))} for path, weight in models
        ]
        return config


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def materialize(finetune: Finetune, base: BaseLM) -> Path:
    """A full-model directory of ``finetune``: itself if full, else base + LoRA merged (cached)."""
    if finetune.kind == "full":
        return finetune.path
    target = cache_dir("materialized") / f"{finetune.content_hash[:24]}-{base.fingerprint.id}"
    if (target / "config.json").exists():
        return target
    logger.info("materialising %s into a full model (once)", finetune.path)
    model = fold_lora(base.load_model(), finetune.path)
    with atomic_directory(target, force=True) as tmp:
        model.save_pretrained(tmp)
        base.load_tokenizer().save_pretrained(tmp)
    return target


class Merger:
    """Merges finetunes of one base: ``Merger(base, "ties").merge(paths, out_dir, scores=...)``."""

    def __init__(
        self,
        base: str | Path | BaseLM = DEFAULT_BASE,
        recipe: str | Path | MergeRecipe = "ties",
        weighting: str = "uniform",
        seed: int = 0,
        progress: bool = True,
    ):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.base = resolve_base(base)
        self.recipe = recipe if isinstance(recipe, MergeRecipe) else MergeRecipe.load(recipe)
        self.weighting, self.seed, self.progress = weighting, seed, progress

    def weights(self, scores: Sequence[float]) -> list[float]:
        """Uniform 1/k, or proportional to the (positive part of the) similarity scores."""
        if self.weighting == "uniform" or not any(s > 0 for s in scores):
            return [1.0 / len(scores)] * len(scores)
        positive = [max(float(s), 0.0) for s in scores]
        return [s / sum(positive) for s in positive]

    def _open(self, sources, scores, weights=None) -> tuple[list[Finetune], list[float]]:
        if not sources:
            raise MergeError("nothing to merge")
        finetunes = [s if isinstance(s, Finetune) else Finetune.open(s) for s in sources]
        if weights is not None:
            if len(weights) != len(finetunes):
                raise MergeError(f"{len(weights)} weights for {len(finetunes)} models")
            return finetunes, [float(w) for w in weights]
        return finetunes, self.weights(scores if scores is not None else [1.0] * len(finetunes))

    def merge(
        self,
        sources: Sequence[str | Path | Finetune],
        out_dir: str | Path,
        scores: Sequence[float] | None = None,
        provenance: dict | None = None,
        force: bool = False,
        weights: Sequence[float] | None = None,
    ) -> Path:
        """Merge ``sources`` (LoRA or full finetunes of the base) into a model at ``out_dir``.

        ``weights`` (one per source) replace the weighting of ``scores``."""
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions

        out_dir = refuse_existing(out_dir, force)
        finetunes, weights = self._open(sources, scores, weights)
        clock = time.perf_counter()
        paths = [materialize(ft, self.base) for ft in finetunes]
        materialize_s = time.perf_counter() - clock
        config_dict = self.recipe.render(self.base.path, list(zip(paths, weights, strict=True)))
        try:
            config = MergeConfiguration.model_validate(config_dict)
        except Exception as exc:  # pydantic's ValidationError: mergekit's own message
            raise MergeError(f"recipe {self.recipe.source} is not a valid mergekit config:\n{exc}") from exc
        options = MergeOptions(random_seed=self.seed, quiet=not self.progress, copy_tokenizer=True)
        clock = time.perf_counter()
        with atomic_directory(out_dir, force=force) as tmp:
            try:
                run_merge(config, str(tmp), options)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise MergeError(f"mergekit failed with recipe {self.recipe.name}: {exc}") from exc
            seconds = {"materialize": materialize_s, "merge": time.perf_counter() - clock}
            extra = {"output": "model", "mergekit_config": config_dict, "seconds": seconds}
            _write_provenance(tmp, self, finetunes, weights, scores, {**extra, **(provenance or {})})
        logger.info("merged %d models with %s into %s", len(finetunes), self.recipe.name, out_dir)
        return out_dir

    def merge_adapters(
        self,
        sources: Sequence[str | Path | Finetune],
        out_dir: str | Path,
        scores: Sequence[float] | None = None,
        provenance: dict | None = None,
        force: bool = False,
        rank: int | None = None,
        weights: Sequence[float] | None = None,
    ) -> Path:
        """PEFT-native merge of LoRA adapters into one adapter (``add_weighted_adapter``).

        TIES-style recipes return the best rank-``rank`` approximation of the merged delta of each
        layer (default: the sum of the adapters' ranks); linear ones are exact at any rank.

        TIES prunes with ``magnitude_prune`` by patching ``peft.utils.merge_utils.magnitude_based_pruning``
        for the duration of the merge: PEFT's ``add_weighted_adapter`` has no parameter or hook for a
        pruning function, and a TIES of our own would duplicate PEFT's sign election, disjoint merge and
        SVD refactoring. ``tests/test_merge.py`` fails if PEFT renames the function, changes its
        signature or stops calling it on this path.
        """
        from peft import PeftModel
        from peft.utils import merge_utils

        out_dir = refuse_existing(out_dir, force)
        combination = self.recipe.adapter_combination
        finetunes, weights = self._open(sources, scores, weights)
        if any(ft.kind != "lora" for ft in finetunes):
            raise MergeError("an adapter merge needs LoRA adapters only; merge full models with merge()")
        names = [f"m{i}" for i in range(len(finetunes))]
        base_model = self.base.load_model()
        model = PeftModel.from_pretrained(base_model, str(finetunes[0].path), adapter_name=names[0])
        for name, ft in zip(names[1:], finetunes[1:], strict=True):
            model.load_adapter(str(ft.path), adapter_name=name)
        density = self.recipe.template.get("per_model", {}).get("density")
        peft_weights, options = weights, {}
        if combination.endswith("_svd"):
            rank = min(rank or sum(model.peft_config[name].r for name in names), _full_rank(model))
            if self.recipe.template.get("parameters", {}).get("normalize", True):
                # PEFT divides by the number of agreeing models, mergekit by their weight sum: weights
                # scaled by k make the two equal for uniform weights (the default weighting).
                peft_weights = [w * len(weights) for w in weights]
            options = {"svd_rank": rank, "svd_full_matrices": False}
        # DARE drops parameters at random: seeded, the caller's RNG untouched. TIES prunes by magnitude
        # with ``magnitude_prune`` (the same entries as PEFT's own, 4x faster).
        fast_prune = mock.patch.object(merge_utils, "magnitude_based_pruning", magnitude_prune)
        with torch.random.fork_rng(), fast_prune:
            torch.manual_seed(self.seed)
            model.add_weighted_adapter(
                names, peft_weights, "default", combination_type=combination, density=density, **options
            )
        model.set_adapter("default")  # deleting the active adapter would warn
        for name in names:
            model.delete_adapter(name)
        with atomic_directory(out_dir, force=force) as tmp:
            model.save_pretrained(str(tmp), selected_adapters=["default"])
            extra = {"output": "adapter", "peft_combination": combination, "density": density, "rank": rank}
            _write_provenance(tmp, self, finetunes, weights, scores, {**extra, **(provenance or {})})
        return out_dir


def magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """``tensor`` with all but its ``density`` fraction of largest magnitudes set to zero.

    Patched in for PEFT's ``magnitude_based_pruning(tensor, density)`` during ``merge_adapters`` (same
    signature; see there why a patch).

    PEFT's ``magnitude_based_pruning`` keeps the same entries (unless magnitudes tie exactly at the
    threshold) with a ``topk`` of that fraction of the tensor; a ``kthvalue`` threshold is ~4x faster
    on CPU (a 576x1536 delta: 45 -> 11 ms; a 3-adapter TIES merge of SmolLM2: 24 -> 14 s).
    """
    keep = int(density * tensor.numel())
    if keep == 0:
        return torch.zeros_like(tensor)
    if keep >= tensor.numel():
        return tensor.clone()
    magnitude = tensor.abs()
    threshold = magnitude.reshape(-1).kthvalue(tensor.numel() - keep).values
    return tensor * (magnitude > threshold)


def _full_rank(model) -> int:
    """The largest rank every LoRA layer of ``model`` can hold: min over layers of min(out, in)."""
    from peft.tuners.lora import LoraLayer

    return min(min(m.get_base_layer().weight.shape) for m in model.modules() if isinstance(m, LoraLayer))


def _write_provenance(directory: Path, merger: Merger, finetunes, weights, scores, extra: dict) -> None:
    record = {
        "created": datetime.now(timezone.utc).isoformat(),
        "base": {"name": merger.base.name, "fingerprint": merger.base.fingerprint.id},
        "recipe": {"name": merger.recipe.name, "source": merger.recipe.source},
        "weighting": merger.weighting,
        "seed": merger.seed,
        "models": [
            {
                "model_id": ft.model_id,
                "path": str(ft.path),
                "content_hash": ft.content_hash,
                "weight": w,
                "score": None if s is None else float(s),
            }
            for ft, w, s in zip(finetunes, weights, scores or [None] * len(finetunes), strict=True)
        ],  # fmt: skip
        "versions": package_versions(),
        **extra,
    }
    atomic_write_text(directory / PROVENANCE_FILE, json.dumps(record, indent=2, default=str))
