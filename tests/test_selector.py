"""TaskSelector on a tiny zoo of two synthetic domains: 20 examples -> that domain's models first."""

from __future__ import annotations

import json

import pytest

from delta_router.errors import DataError
from delta_router.search.selector import TaskSelector
from delta_router.testing import SYNTHETIC_WORDS, synthetic_domain
from delta_router.training.trainer import TrainConfig
from delta_router.zoo.zoo import Zoo, ZooSpec

FEW_SHOT = TrainConfig(max_steps=5, batch_size=8, learning_rate=1e-2)


@pytest.fixture(scope="module")
def zoo_index(tiny_base, tmp_path_factory):
    spec = ZooSpec("tiny", tuple(SYNTHETIC_WORDS), parts=3, train_size=24, train=FEW_SHOT)
    splits = {name: synthetic_domain(name) for name in SYNTHETIC_WORDS}
    return Zoo(spec, tiny_base, root=tmp_path_factory.mktemp("zoo"), progress=False, splits=splits).build()


def examples(domain: str, n: int = 20):
    """Held-out examples of ``domain`` (another seed than the zoo's training data)."""
    split = synthetic_domain(domain, seed=7)
    return (split.fewshot + split.test)[:n]


@pytest.mark.parametrize("domain", sorted(SYNTHETIC_WORDS))
def test_paper_method_ranks_the_tasks_domain_first(zoo_index, domain):
    selection = TaskSelector(zoo_index, train_config=FEW_SHOT, progress=False).select(examples(domain), k=3)
    assert [h.entry.tags["domain"] for h in selection.hits] == [domain] * 3
    assert selection.hits[0].score >= selection.hits[-1].score
    assert selection.task_adapter and selection.num_examples == 20
    assert json.dumps(selection.to_dict())  # serialisable for --json and provenance


def test_training_free_method_returns_scored_candidates(zoo_index):
    selection = TaskSelector(zoo_index, method="activations", progress=False).select(examples("fruit"), k=6)
    assert len(selection.hits) == 6 and selection.task_adapter is None
    assert all(-1.0 <= h.score <= 1.0 for h in selection.hits)


def test_examples_from_files_and_prompt_completion_dicts(zoo_index, tmp_path):
    rows = [{"prompt": f"Name a fruit item. {r.input}", "completion": r.output} for r in examples("fruit")]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    selector = TaskSelector(zoo_index, method="activations", progress=False)
    from_file, from_list = selector.select(path, k=2), selector.select(rows, k=2)
    assert from_file.model_ids == from_list.model_ids
    assert from_file.examples_sha256 == from_list.examples_sha256


def test_bad_selector_input_is_refused(zoo_index, tmp_path):
    selector = TaskSelector(zoo_index, method="activations", progress=False)
    with pytest.raises(DataError, match="at least 5"):
        selector.select(examples("fruit", 4))
    with pytest.raises(DataError, match="holds only 6"):
        selector.select(examples("fruit"), k=7)
    with pytest.raises(DataError, match="example 2 has an empty output"):
        selector.select([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": " "}] * 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{oops\n')
    with pytest.raises(DataError, match=":3"):
        selector.select(bad)


@pytest.fixture(scope="module")
def router(zoo_index):
    """Profiles of every indexed model from its domain's training prompts."""
    from delta_router.routing.router import QueryEncoder, Router, query_text

    base = TaskSelector(zoo_index, method="activations", progress=False).embedder.base
    encoder = QueryEncoder.for_model(base.load_model(), base.load_tokenizer())
    texts = {e.model_id: [query_text(r) for r in synthetic_domain(e.tags["domain"]).train[0]]
             for e in zoo_index.list()}  # fmt: skip
    return Router.fit(encoder, base.fingerprint, texts)


@pytest.mark.parametrize("domain", sorted(SYNTHETIC_WORDS))
def test_queries_method_ranks_by_what_the_examples_ask_not_how_they_answer(zoo_index, router, domain):
    from dataclasses import replace

    selector = TaskSelector(zoo_index, method="queries", router=router, progress=False)
    given = selector.select(examples(domain), k=3)
    assert [h.entry.tags["domain"] for h in given.hits] == [domain] * 3 and given.task_adapter is None
    lettered = selector.select([replace(r, output="B") for r in examples(domain)], k=3)
    assert lettered.model_ids == given.model_ids
    assert [h.score for h in lettered.hits] == [h.score for h in given.hits]


def test_queries_method_needs_a_router_of_the_same_base(zoo_index, router, other_base):
    from delta_router.errors import IncompatibleBaseError
    from delta_router.models.base import resolve_base
    from delta_router.routing.router import QueryEncoder, Router

    with pytest.raises(DataError, match="needs a router"):
        TaskSelector(zoo_index, method="queries", progress=False)
    other = resolve_base(other_base)
    encoder = QueryEncoder.for_model(other.load_model(), other.load_tokenizer())
    foreign = Router.fit(encoder, other.fingerprint, {m: ["a question"] for m in router.model_ids})
    with pytest.raises(IncompatibleBaseError):
        TaskSelector(zoo_index, method="queries", router=foreign, progress=False)
    part = router.restricted(lambda m: m in router.model_ids[:2])
    selector = TaskSelector(zoo_index, method="queries", router=part, progress=False)
    assert set(selector.select(examples("fruit"), k=2).model_ids) == set(router.model_ids[:2])
    with pytest.raises(DataError, match="only 2 indexed models have a router profile"):
        selector.select(examples("fruit"), k=3)


def test_select_command_by_queries(zoo_index, router, tmp_path, capsys):
    from delta_router.cli import main

    write_task(tmp_path, "fruit")
    router.save(tmp_path / "router")
    common = ["select", "--examples", str(tmp_path / "task.jsonl"), "--index", str(zoo_index.directory)]
    assert main([*common, "--method", "queries", "--router", str(tmp_path / "router"), "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["candidates"]
    assert [h["tags"]["domain"] for h in hits] == ["fruit"] * 3
    assert main([*common, "--router", str(tmp_path / "router")]) == 2  # with the default method
    assert "--method queries" in capsys.readouterr().err


def write_task(tmp_path, domain: str) -> list[str]:
    rows = [r.to_dict() for r in examples(domain, 30)]
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:20]))
    (tmp_path / "held-out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    return ["--examples", str(tmp_path / "task.jsonl"), "--eval", str(tmp_path / "held-out.jsonl")]


def test_build_verifies_candidates_and_writes_the_chosen_one(zoo_index, tmp_path, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM

    from delta_router.cli import main
    from delta_router.merging.merger import PROVENANCE_FILE
    from delta_router.search import selector

    monkeypatch.setattr(selector, "FEWSHOT_TRAIN_CONFIG", FEW_SHOT)
    zoo_index.save(tmp_path / "index")
    argv = ["build", *write_task(tmp_path, "digits"), "--index", str(tmp_path / "index"), "-k", "2",
            "--out", str(tmp_path / "built")]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    verification = result["verification"]
    names = [c["name"] for c in verification["candidates"]]
    assert names[0] == "base" and result["chosen"] == verification["chosen"] in names
    assert {"task LoRA", "task head"} <= set(names)
    assert {"single", "merge", "lorahub", "task-lora"} <= {c["origin"] for c in verification["candidates"]}
    for candidate in verification["candidates"][1:]:
        gain = candidate["gain_over_base"]["interval"]
        assert gain["low"] <= gain["mean"] <= gain["high"]
        assert candidate["cross_validated"] == (candidate["origin"] in ("lorahub", "task-lora"))
    provenance = json.loads((tmp_path / "built" / PROVENANCE_FILE).read_text())
    assert provenance["verification"] == verification
    card = (tmp_path / "built" / "README.md").read_text()
    assert "## Verification" in card and f"Returned: {result['chosen']}" in card
    AutoModelForCausalLM.from_pretrained(tmp_path / "built")
    assert {"built", "random-2 linear", "base"} <= set(result["scores"])
    assert main(argv) == 2  # the output exists: refused without --force
    assert "already exists" in capsys.readouterr().err

    assert main([*argv[:-1], str(tmp_path / "table")]) == 0  # the human-readable output
    out = capsys.readouterr().out
    assert "candidate" in out and f"wrote {result['chosen']}" in " ".join(out.split())


def test_build_keeps_the_base_when_nothing_clears_the_noise(
    zoo_index, tiny_base, tmp_path, capsys, monkeypatch
):  # noqa: E501
    import torch
    from peft import PeftModel

    from delta_router.cli import main
    from delta_router.models.base import resolve_base
    from delta_router.search import selector

    monkeypatch.setattr(selector, "FEWSHOT_TRAIN_CONFIG", FEW_SHOT)
    zoo_index.save(tmp_path / "index")
    argv = ["build", *write_task(tmp_path, "fruit")[:2], "--index", str(tmp_path / "index"), "-k", "2",
            "--prior", "base", "--confidence", "0.999999", "--output", "adapter",
            "--out", str(tmp_path / "kept"), "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["chosen"] == "base" and "no candidate beats the base" in result["verification"]["reason"]
    base = resolve_base(tiny_base)
    ids = torch.tensor([[1, 2, 3, 4]])
    kept = PeftModel.from_pretrained(base.load_model(), str(tmp_path / "kept"))  # a no-op adapter
    torch.testing.assert_close(kept(ids).logits, base.load_model()(ids).logits)


def test_unverified_build_merges_the_top_k_with_the_recipe(zoo_index, tmp_path, capsys, monkeypatch):
    from delta_router.cli import main
    from delta_router.merging.merger import PROVENANCE_FILE
    from delta_router.search import selector

    monkeypatch.setattr(selector, "FEWSHOT_TRAIN_CONFIG", FEW_SHOT)
    zoo_index.save(tmp_path / "index")
    argv = ["build", *write_task(tmp_path, "digits")[:2], "--index", str(tmp_path / "index"), "-k", "2",
            "--no-verify", "--recipe", "ties", "--output", "adapter", "--rank", "3",
            "--out", str(tmp_path / "adapter"), "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    chosen = [c["model_id"] for c in result["selection"]["candidates"]]
    assert len(chosen) == 2 and all(c.startswith("digits-") for c in chosen)
    assert result["verification"] is None and result["chosen"] == "top-2 ties"
    provenance = json.loads((tmp_path / "adapter" / PROVENANCE_FILE).read_text())
    assert [m["model_id"] for m in provenance["models"]] == chosen
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 3
    model_argv = [a for a in argv if a not in ("--output", "adapter")]
    assert main([*model_argv[:-3], "--out", str(tmp_path / "other")]) == 2  # rank: adapters only
    assert "output='adapter'" in capsys.readouterr().err


def test_lorahub_command_learns_weights_for_the_selected_adapters(zoo_index, tiny_base, tmp_path, capsys):
    from peft import PeftModel

    from delta_router.cli import main
    from delta_router.models.base import resolve_base

    index_dir = tmp_path / "index"
    zoo_index.save(index_dir)
    (tmp_path / "task.jsonl").write_text("".join(json.dumps(r.to_dict()) + "\n" for r in examples("fruit")))
    argv = ["lorahub", "--examples", str(tmp_path / "task.jsonl"), "--index", str(index_dir), "--k", "2",
            "--method", "activations", "--budget", "6", "--out", str(tmp_path / "hub")]  # fmt: skip
    assert main([*argv, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result["weights"]) == [c["model_id"] for c in result["selection"]["candidates"]]
    PeftModel.from_pretrained(resolve_base(tiny_base).load_model(), str(tmp_path / "hub"))
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
