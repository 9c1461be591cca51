"""Merger: every recipe in merge_recipes/ on the tiny model, weights, provenance, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from delta_router.errors import MergeError
from delta_router.merging.merger import (
    PROVENANCE_FILE,
    Merger,
    MergeRecipe,
    available_recipes,
    magnitude_prune,
    materialize,
)
from delta_router.models.base import resolve_base
from delta_router.models.finetunes import Finetune


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


def test_adapter_merge_refuses_recipes_without_a_peft_counterpart(tiny_base, adapters, tmp_path):
    with pytest.raises(MergeError, match="no PEFT adapter counterpart"):
        Merger(tiny_base, "della", progress=False).merge_adapters(adapters[:2], tmp_path / "x")


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


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_magnitude_prune_keeps_what_peft_keeps(density):
    from peft.utils.merge_utils import magnitude_based_pruning

    generator = torch.Generator().manual_seed(0)
    for shape in [(48, 64), (64, 8), (7,)]:
        tensor = torch.randn(shape, generator=generator)
        expected = magnitude_based_pruning(tensor, density)
        assert torch.equal(magnitude_prune(tensor, density), expected)
        assert int((expected != 0).sum()) == int(density * tensor.numel())


def test_peft_ties_still_prunes_through_the_function_merge_adapters_patches(tiny_base, adapters):
    """``merge_adapters`` swaps in ``magnitude_prune`` for PEFT's ``magnitude_based_pruning``: fail
    loudly if PEFT renames it, changes its signature, or stops calling it on the TIES path."""
    import inspect
    from unittest import mock

    from peft import PeftModel
    from peft.utils import merge_utils

    original = merge_utils.magnitude_based_pruning
    assert list(inspect.signature(original).parameters) == ["tensor", "density"]
    assert list(inspect.signature(magnitude_prune).parameters) == ["tensor", "density"]
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_base), str(adapters[0]), adapter_name="a"
    )
    model.load_adapter(str(adapters[1]), adapter_name="b")
    combination = MergeRecipe.load("ties").adapter_combination
    with mock.patch.object(merge_utils, "magnitude_based_pruning", wraps=original) as spy:
        model.add_weighted_adapter(
            ["a", "b"], [1.0, 1.0], "merged", combination_type=combination, density=0.5, svd_rank=4
        )
    assert spy.call_count > 0
    assert all(call.args[1:] == (0.5,) or call.kwargs.get("density") == 0.5 for call in spy.call_args_list)
