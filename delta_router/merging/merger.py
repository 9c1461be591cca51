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
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import torch
import yaml

from delta_router import checks
from delta_router.errors import MergeError
from delta_router.home import atomic_directory, atomic_write_text, cache_dir, refuse_existing
from delta_router.models.base import DEFAULT_BASE, BaseLM, resolve_base
from delta_router.models.finetunes import Finetune, check_fits, fold_lora, iter_full_weights
from delta_router.versions import package_versions

logger = logging.getLogger(__name__)

# The recipes: the repository's top-level merge_recipes/, installed as delta_router.merge_recipes
# (pyproject.toml maps it), so they are found the same way in a checkout and from a wheel.
RECIPE_DIR = Path(str(resources.files("delta_router.merge_recipes")))
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
    def is_linear(self) -> bool:
        """A weighted sum of the finetunes' deltas (``linear``, ``task_arithmetic``): exact as stacked
        LoRA factors, and computable in memory (``merging.candidates``)."""
        return self.method in ("linear", "task_arithmetic")

    @property
    def adapter_combination(self) -> str:
        """How ``Merger.merge_adapters`` merges adapters with this recipe: ``"cat"`` (PEFT's stacked
        factors, exact) for linear recipes, else ``"mergekit_svd"`` (mergekit's merge, factored)."""
        return "cat" if self.is_linear else "mergekit_svd"

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


def adapter_merge_refusal(finetunes: Sequence[Finetune]) -> str | None:
    """Why ``Merger.merge_adapters`` cannot hold the merge of ``finetunes`` exactly (a full model,
    DoRA, saved modules), or ``None`` when it can; ``Merger.merge`` merges any of them."""
    if any(ft.kind != "lora" for ft in finetunes):
        return "an adapter merge needs LoRA adapters only; merge full models with merge()"
    for ft in finetunes:
        cfg = ft.adapter_config
        if cfg.get("use_dora") or cfg.get("modules_to_save"):
            what = "DoRA" if cfg.get("use_dora") else "saved modules (modules_to_save)"
            return (
                f"{ft.path}: uses {what}; a merged LoRA adapter cannot hold it exactly: "
                "merge into a full model instead (--output model)"
            )
    return None


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
        sources = checks.sources(sources)
        if not sources:
            raise MergeError("nothing to merge")
        finetunes = [s if isinstance(s, Finetune) else Finetune.open(s) for s in sources]
        for finetune in finetunes:
            check_fits(finetune, self.base)
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
        """Merge LoRA adapters into one LoRA adapter, exactly where a LoRA can hold the merge.

        ``linear`` / ``task_arithmetic``: PEFT's ``add_weighted_adapter(combination_type="cat")``
        stacks the weighted factors, so the adapter's delta is exactly ``sum_i w_i delta_i`` at any
        rank, for adapters of different ranks, target modules, rsLoRA and negative weights (tested).
        Every other recipe: mergekit merges the full models (as ``merge`` does), and each changed
        layer's delta is factored back by a truncated SVD of rank ``rank`` (default: the sum of the
        adapters' ranks, at most the layers' full rank): the best rank-``rank`` approximation of
        mergekit's merge. (PEFT's own TIES-SVD of adapters differs from mergekit's TIES as soon as
        ranks, target modules or rsLoRA differ.) DoRA adapters and ones with saved modules are
        refused: no LoRA adapter holds their merge; merge them into a full model.
        """
        out_dir = refuse_existing(out_dir, force)
        finetunes, weights = self._open(sources, scores, weights)
        refusal = adapter_merge_refusal(finetunes)
        if refusal is not None:
            raise MergeError(refusal)
        with atomic_directory(out_dir, force=force) as tmp:
            if self.recipe.adapter_combination == "cat":
                self._stack_adapters(finetunes, self._normalized(weights), tmp)
                extra = {"peft_combination": "cat", "rank": None}
            else:
                rank = self._factor_merge(finetunes, weights, rank, tmp)
                extra = {"peft_combination": "mergekit_svd", "rank": rank}
            extra["output"] = "adapter"
            _write_provenance(tmp, self, finetunes, weights, scores, {**extra, **(provenance or {})})
        return out_dir

    def _normalized(self, weights: list[float]) -> list[float]:
        """``weights`` divided by their sum where the recipe normalises (as mergekit would)."""
        total = sum(weights)
        if self.recipe.template.get("parameters", {}).get("normalize", False) and total != 0:
            return [w / total for w in weights]
        return weights

    def _stack_adapters(self, finetunes: list[Finetune], weights: list[float], out: Path) -> None:
        """PEFT's ``cat`` combination of the weighted adapters, saved to ``out``."""
        from peft import PeftModel

        names = [f"m{i}" for i in range(len(finetunes))]
        first = str(finetunes[0].path)
        model = PeftModel.from_pretrained(self.base.load_model(), first, adapter_name=names[0])
        for name, ft in zip(names[1:], finetunes[1:], strict=True):
            model.load_adapter(str(ft.path), adapter_name=name)
        model.add_weighted_adapter(names, weights, "default", combination_type="cat")
        model.set_adapter("default")  # deleting the active adapter would warn
        for name in names:
            model.delete_adapter(name)
        model.save_pretrained(str(out), selected_adapters=["default"])

    def _factor_merge(
        self, finetunes: list[Finetune], weights: list[float], rank: int | None, out: Path
    ) -> int:
        """mergekit's merge of the adapters, each changed layer's delta factored at ``rank``: the rank."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        from delta_router.models.finetunes import ADAPTER_WEIGHTS, PEFT_PREFIX, load_lora_factors

        base_model = self.base.load_model()
        factors = [load_lora_factors(ft, base_model, self.base).factors for ft in finetunes]
        modules = sorted(set().union(*factors))
        params = dict(base_model.named_parameters())
        full = {m: min(params[f"{m}.weight"].shape) for m in modules}  # each layer's largest rank
        rank = min(rank or sum(int(ft.adapter_config.get("r", 8)) for ft in finetunes), max(full.values()))
        ranks = {m: min(rank, full[m]) for m in modules}
        with tempfile.TemporaryDirectory(dir=cache_dir("tmp")) as work:
            merged = self.merge(finetunes, Path(work) / "merged", weights=weights)
            merged_weights = dict(iter_full_weights(Finetune.open(merged), self.base))
        tensors = {}
        for module, r in ranks.items():
            delta = merged_weights[f"{module}.weight"].to(torch.float32) - params[f"{module}.weight"].detach()
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = vh[:r].contiguous()
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = (u[:, :r] * s[:r]).contiguous()
        smaller = {m: r for m, r in ranks.items() if r < rank}  # layers too small for ``rank``
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=modules, rank_pattern=smaller,
            alpha_pattern=smaller, init_lora_weights=False,
        )  # fmt: skip
        config.base_model_name_or_path = str(self.base.path)
        config.save_pretrained(str(out))
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        return rank


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
