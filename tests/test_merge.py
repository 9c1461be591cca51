"""Merger: every recipe in merge_recipes/ on the tiny model, weights, provenance, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from delta_router.errors import InvalidModelError, MergeError
from delta_router.merging.candidates import Candidate, DeltaPatcher
from delta_router.merging.merger import (
    PROVENANCE_FILE,
    Merger,
    MergeRecipe,
    available_recipes,
    materialize,
)
from delta_router.models.base import resolve_base
from delta_router.models.finetunes import Finetune
from delta_router.testing import RandomAdapterFactory


def test_the_issue_recipes_are_all_there():
    wanted = {"linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs"}
    assert wanted <= set(available_recipes())


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_merges_into_a_loadable_model(recipe, tiny_base, adapters, tmp_path):
    out = Merger(tiny_base, recipe, weighting="score", progress=False).merge(
        adapters[:3], tmp_path / "merged", scores=[0.9, 0.6, 0.3], provenance={"examples_sha256": "abc"}
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[q], base.state_dict()[q])  # the finetunes moved it
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert [m["model_id"] for m in record["models"]] == [p.name for p in adapters[:3]]
    assert sum(m["weight"] for m in record["models"]) == pytest.approx(1.0)
    assert record["recipe"]["name"] == recipe and record["examples_sha256"] == "abc"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_linear_merge_of_one_model_is_that_model(tiny_base, adapters, tmp_path):
    out = Merger(tiny_base, "linear", progress=False).merge(adapters[:1], tmp_path / "one")
    full = materialize(Finetune.open(adapters[0]), resolve_base(tiny_base))
    merged = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(full).state_dict().items():
        torch.testing.assert_close(merged[name], tensor)


def test_score_weights_are_proportional_and_uniform_is_flat(tiny_base):
    assert Merger(tiny_base, "ties", weighting="score").weights([3.0, 1.0]) == [0.75, 0.25]
    assert Merger(tiny_base, "ties").weights([3.0, 1.0]) == [0.5, 0.5]


def test_bad_recipes_and_existing_output_are_refused(tiny_base, adapters, tmp_path):
    with pytest.raises(MergeError, match="no merge recipe 'nope'"):
        Merger(tiny_base, "nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: ties\nper_model:\n  density: [oops\n")
    with pytest.raises(MergeError, match="not valid YAML"):
        MergeRecipe.load(bad)
    bad.write_text("merge_method: no_such_method\nper_model:\n  weight: '{weight}'\n")
    with pytest.raises(MergeError, match="not a valid mergekit config|mergekit failed"):
        Merger(tiny_base, bad, progress=False).merge(adapters[:2], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        Merger(tiny_base, "linear", progress=False).merge(adapters[:2], tmp_path / "exists")
    assert (tmp_path / "exists" / "notes.txt").read_text() == "mine"


def test_corrupt_adapter_is_named_not_a_traceback(tiny_base, adapters, tmp_path):
    broken = Path(shutil.copytree(adapters[0], tmp_path / "broken"))
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # header intact, data cut
    with pytest.raises(InvalidModelError, match="broken/adapter_model.safetensors: corrupt"):
        Merger(tiny_base, "linear", progress=False).merge([adapters[1], broken], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_finetune_of_another_base_is_refused_before_merging_or_scoring(
    tiny_base, other_base, adapters, tmp_path
):
    from delta_router.errors import IncompatibleBaseError
    from delta_router.evaluation.harness import load_for_eval

    foreign = RandomAdapterFactory(other_base).make(tmp_path / "foreign", seed=0)
    with pytest.raises(IncompatibleBaseError, match="foreign.*does not fit the base"):
        Merger(tiny_base, "linear", progress=False).merge([adapters[0], foreign], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(IncompatibleBaseError, match="does not fit the base"):
        load_for_eval(other_base, resolve_base(tiny_base))  # a full model of other shapes


def test_adapter_merge_stays_small_and_equals_the_linear_full_merge(tiny_base, adapters, tmp_path):
    from peft import PeftModel

    merger = Merger(tiny_base, "linear", weighting="score", progress=False)
    scores = [0.8, 0.2]
    full = merger.merge(adapters[:2], tmp_path / "full", scores=scores)
    small = merger.merge_adapters(adapters[:2], tmp_path / "adapter", scores=scores)
    assert Finetune.open(small).kind == "lora"
    assert json.loads((small / PROVENANCE_FILE).read_text())["peft_combination"] == "cat"
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    via_adapter = PeftModel.from_pretrained(base, str(small)).merge_and_unload().state_dict()
    for name, tensor in AutoModelForCausalLM.from_pretrained(full).state_dict().items():
        torch.testing.assert_close(via_adapter[name], tensor, atol=1e-5, rtol=1e-4)


def test_adapter_merge_of_any_recipe_is_mergekit_merge_factored(tiny_base, adapters, tmp_path):
    from peft import PeftModel

    merger = Merger(tiny_base, "breadcrumbs", progress=False)  # deterministic: no random drops
    full = AutoModelForCausalLM.from_pretrained(merger.merge(adapters[:2], tmp_path / "full")).state_dict()
    small = merger.merge_adapters(adapters[:2], tmp_path / "adapter", rank=64)  # every layer's full rank
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(small))
    merged = model.merge_and_unload().state_dict()
    for name, tensor in full.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-5, rtol=1e-4)


def test_adapter_ties_is_mergekit_ties_of_the_deltas_at_the_chosen_rank(tiny_base, adapters, tmp_path):
    """TIES of three adapters as one adapter = mergekit's full-model TIES, truncated by SVD."""
    from peft import PeftModel

    merger = Merger(tiny_base, "ties", progress=False)
    full = AutoModelForCausalLM.from_pretrained(merger.merge(adapters[:3], tmp_path / "full")).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_base).state_dict()
    for rank in (8, 32):  # k_proj is 32 x 64 in the tiny model: 32 is every layer's full rank
        small = merger.merge_adapters(adapters[:3], tmp_path / f"adapter-{rank}", rank=rank)
        assert json.loads((small / PROVENANCE_FILE).read_text())["rank"] == rank
        model = AutoModelForCausalLM.from_pretrained(tiny_base)
        via_adapter = PeftModel.from_pretrained(model, str(small)).merge_and_unload().state_dict()
        for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
            u, s, vh = torch.linalg.svd(full[name] - base[name], full_matrices=False)
            best = (u[:, :rank] * s[:rank]) @ vh[:rank]
            torch.testing.assert_close(via_adapter[name] - base[name], best, atol=1e-5, rtol=1e-4)
    default = merger.merge_adapters(adapters[:3], tmp_path / "adapter")  # rank: 3 x r=8 adapters
    assert json.loads((default / PROVENANCE_FILE).read_text())["rank"] == 24


def test_adapter_dare_ties_is_seeded(tiny_base, adapters, tmp_path):
    from safetensors.torch import load_file

    def merged(seed: int, name: str) -> dict:
        out = Merger(tiny_base, "dare_ties", seed=seed, progress=False).merge_adapters(
            adapters[:3], tmp_path / name
        )
        return load_file(out / "adapter_model.safetensors")

    first, again, other = merged(0, "a"), merged(0, "b"), merged(1, "c")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.fixture(scope="module")
def mixed_adapters(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """Adapters that differ the way public finetunes do: rank, target modules, rsLoRA, DoRA."""
    root = tmp_path_factory.mktemp("mixed")
    kinds = {
        "plain": {},
        "rslora-qv-r4": {"r": 4, "alpha": 8, "targets": ("q_proj", "v_proj"), "use_rslora": True},
        "r16": {"r": 16, "alpha": 16},
        "dora-r4": {"r": 4, "alpha": 8, "use_dora": True},
    }
    return {
        name: RandomAdapterFactory(tiny_base, **options).make(root / name, seed=i, scale=0.1)
        for i, (name, options) in enumerate(kinds.items())
    }


def exact_merge(tiny_base, members) -> dict[str, torch.Tensor]:
    base = resolve_base(tiny_base)
    model = base.load_model()
    candidate = Candidate("exact", "merge", tuple((Finetune.open(p), w) for p, w in members))
    with DeltaPatcher(model, base).patched(candidate) as patched:
        return {k: v.clone() for k, v in patched.state_dict().items()}


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (1.0, -0.5, 0.5)])
def test_mixed_adapters_merge_exactly_as_adapter_and_as_model(tiny_base, mixed_adapters, tmp_path, weights):
    """Different ranks, target modules, rsLoRA and negative weights: the adapter merge, mergekit's
    full merge and the sum of the deltas agree."""
    from peft import PeftModel

    paths = [mixed_adapters[n] for n in ("plain", "rslora-qv-r4", "r16")]
    exact = exact_merge(tiny_base, zip(paths, weights, strict=True))
    merger = Merger(tiny_base, MergeRecipe.load("task_arithmetic").with_parameters(normalize=False))
    full = AutoModelForCausalLM.from_pretrained(merger.merge(paths, tmp_path / "full", weights=weights))
    small = merger.merge_adapters(paths, tmp_path / "adapter", weights=weights)
    via_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(small))
    for merged in (full.state_dict(), via_adapter.merge_and_unload().state_dict()):
        for name, tensor in exact.items():
            torch.testing.assert_close(merged[name], tensor, atol=1e-5, rtol=1e-4)


def test_mixed_ties_adapter_is_mergekit_ties(tiny_base, mixed_adapters, tmp_path):
    from peft import PeftModel

    paths = [mixed_adapters[n] for n in ("plain", "rslora-qv-r4", "r16")]
    merger = Merger(tiny_base, "ties", progress=False)
    full = AutoModelForCausalLM.from_pretrained(merger.merge(paths, tmp_path / "full")).state_dict()
    small = merger.merge_adapters(paths, tmp_path / "adapter", rank=64)  # every layer's full rank
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), str(small))
    merged = model.merge_and_unload().state_dict()
    for name, tensor in full.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-5, rtol=1e-4)


def test_dora_merges_into_a_model_exactly_and_is_refused_as_an_adapter(tiny_base, mixed_adapters, tmp_path):
    paths = [mixed_adapters["plain"], mixed_adapters["dora-r4"]]
    exact = exact_merge(tiny_base, [(p, 0.5) for p in paths])
    merger = Merger(tiny_base, "linear", progress=False)
    full = AutoModelForCausalLM.from_pretrained(merger.merge(paths, tmp_path / "full")).state_dict()
    for name, tensor in exact.items():
        torch.testing.assert_close(full[name], tensor, atol=1e-5, rtol=1e-4)
    with pytest.raises(MergeError, match="uses DoRA.*--output model"):
        merger.merge_adapters(paths, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
