"""A tiny zoo (tiny model, two synthetic domains with distinct token distributions) and its report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from delta_router.evaluation.clustering import nearest_neighbours, silhouette
from delta_router.testing import SYNTHETIC_WORDS as WORDS
from delta_router.testing import synthetic_domain
from delta_router.training.trainer import TrainConfig
from delta_router.zoo.report import build_report
from delta_router.zoo.zoo import ROBUSTNESS_VARIANTS, Zoo, ZooSpec


@pytest.fixture()
def tiny_zoo(tiny_base, tmp_path) -> Zoo:
    spec = ZooSpec(
        "tiny",
        ("fruit", "digits"),
        parts=3,
        mixtures=(("fruit", "digits"),),
        robustness_domains=("fruit",),
        train_size=24,
        train=TrainConfig(max_steps=5, batch_size=8, micro_batch_size=8, learning_rate=1e-2),
    )
    splits = {name: synthetic_domain(name) for name in WORDS}
    return Zoo(spec, tiny_base, root=tmp_path / "zoo", progress=False, splits=splits)


def test_spec_lists_domain_mixture_and_robustness_members(tiny_zoo):
    members = tiny_zoo.spec.members()
    kinds = [m.kind for m in members]
    assert kinds.count("domain") == 6 and kinds.count("mixture") == 1
    assert kinds.count("robustness") == len(ROBUSTNESS_VARIANTS)
    configs = {m.variant: tiny_zoo.spec.train_config(m) for m in members if m.kind == "robustness"}
    assert configs["r4"].rank == 4 and configs["half-data"].num_examples == 12
    assert configs["lr-double"].learning_rate == pytest.approx(2e-2)
    mixture = next(m for m in members if m.kind == "mixture")
    data = tiny_zoo.training_records(mixture)
    assert len(data) == 24 and {r.instruction for r in data} == {"Name a fruit item.", "Name a digits item."}


def test_tiny_zoo_clusters_by_domain_and_is_cached(tiny_zoo, monkeypatch):
    index = tiny_zoo.build()
    assert len(index) == len(tiny_zoo.spec.members())
    entries = [e for e in index.list() if e.tags["kind"] == "domain"]
    vectors = np.stack([e.embedding.vector for e in entries])
    assert silhouette(vectors, [e.tags["domain"] for e in entries]) > 0.5

    from delta_router.training.trainer import LoraTrainer

    monkeypatch.setattr(LoraTrainer, "_step", lambda *a: pytest.fail("a second build retrained"))
    again = tiny_zoo.build()
    assert [e.model_id for e in again.list()] == [e.model_id for e in index.list()]


def test_report_writes_markdown_json_and_png(tiny_zoo):
    tiny_zoo.build()
    report = build_report(tiny_zoo, eval_size=8, progress=False)
    out = tiny_zoo.root / "report"
    assert (out / "tsne.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((out / "report.json").read_text())
    assert saved["silhouette_domain"] == pytest.approx(report.silhouette_domain)
    assert set(saved["member_scores"]) == {f"{d}-{p}" for d in WORDS for p in range(3)}
    assert set(report.base_scores) == set(WORDS) and report.base_scores["fruit"].acc is not None
    assert "Silhouette" in (out / "report.md").read_text()


def test_silhouette_and_neighbours_on_separated_clusters():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(2, 16))
    vectors = np.concatenate([c + 0.05 * rng.normal(size=(4, 16)) for c in centers])
    labels = ["a"] * 4 + ["b"] * 4
    assert silhouette(vectors, labels) > 0.8
    assert silhouette(vectors, ["a", "b"] * 4) < 0.1
    neighbours = nearest_neighbours(vectors, [f"m{i}" for i in range(8)], labels)
    assert all(n.same_label and n.item != n.neighbour for n in neighbours)


def test_wild_spec_draws_recorded_recipes_and_keeps_held_out_records_out(tiny_base, tmp_path):
    from dataclasses import replace

    from delta_router.models.finetunes import Finetune
    from delta_router.testing import tiny_wild_zoo

    zoo = tiny_wild_zoo(tiny_base, tmp_path / "zoo")
    spec, leaked = zoo.spec, zoo.splits("fruit").test[0]
    members = spec.members()
    assert members == spec.members() != replace(spec, seed=1).members()
    assert [m.kind for m in members].count("generalist") == 1 and len(members) == 2 * 3 + 1 + 1
    other_dataset = next(m for m in members if m.dataset == "fruit-b")
    assert leaked in zoo.splits("fruit-b").train[other_dataset.part]
    assert leaked not in zoo.training_records(other_dataset)

    index = zoo.build()
    tags = {e.model_id: e.tags for e in index.list()}
    assert {t["method"] for t in tags.values()} >= {"full"} and all("format" in t for t in tags.values())
    assert tags[other_dataset.id]["dataset"] == "fruit-b" and tags["generalist-0"]["domain"] == "generalist"
    full = next(m for m in members if m.variant == "full")
    assert Finetune.open(zoo.adapter_dir(full)).kind == "full"
    saved = json.loads((zoo.adapter_dir(other_dataset) / "training.json").read_text())
    assert saved["config"] == spec.train_config(other_dataset).to_dict()
    assert saved["data"]["member"]["dataset"] == "fruit-b"

    report = build_report(zoo, eval_size=4, progress=False)  # each scored in the format it was trained in
    single = [m for m in members if m.kind == "domain"]
    assert report.member_formats == {m.id: spec.train_config(m).prompt_format for m in single}
    for member in single:  # on its own dataset's test set, which the synthetic datasets all have
        test, fmt = spec.source(member, member.domains[0]), report.member_formats[member.id]
        assert report.member_tests[member.id] == test
        key = test if fmt == "alpaca" else f"{test} ({fmt})"
        assert report.base_score(member.id) is report.base_scores[key]
    strong = build_report(
        zoo, eval_size=4, progress=False, out_dir=tmp_path / "strong", where={"variant": "strong"}
    )
    assert set(strong.member_scores) == {m.id for m in single if m.variant == "strong"}
    assert (tmp_path / "strong" / "report.md").exists()


def test_wild_deep_strong_member_reads_fresh_records_and_a_changed_recipe_retrains(tiny_base, tmp_path):
    from dataclasses import replace

    from delta_router.testing import tiny_wild_zoo
    from delta_router.zoo.zoo import Zoo

    zoo = tiny_wild_zoo(tiny_base, tmp_path / "zoo")
    deep = replace(zoo.spec, deep=("fruit",), deep_layers=1, deep_steps=8)
    deep = replace(deep, strong_datasets={"fruit": "fruit-b"})
    strong = next(m for m in deep.members() if m.variant == "strong" and m.domains == ("fruit",))
    assert strong.dataset == "fruit-b" and dict(strong.options)["lora_layers"] == 1
    assert deep.records_for(strong) == 8 * deep.train.batch_size > deep.train_size
    plain = next(m for m in zoo.spec.members() if m.id == strong.id)
    assert "lora_layers" not in dict(plain.options) and zoo.spec.records_for(plain) == zoo.spec.train_size

    def runs() -> dict[str, str]:
        return {m.id: (zoo.adapter_dir(m) / "training.json").read_text() for m in zoo.spec.members()}

    zoo.build()
    before = runs()
    rebuilt = Zoo(deep, tiny_base, root=zoo.root, progress=False, splits=zoo._splits)
    tags = {e.model_id: e.tags for e in rebuilt.build().list()}
    after = runs()
    assert after.pop(strong.id) != before.pop(strong.id) and after == before  # only the changed one retrains
    assert tags[strong.id]["dataset"] == "fruit-b"

    scored = build_report(
        rebuilt, eval_size=4, progress=False, out_dir=tmp_path / "r1", where={"variant": "strong"}
    )
    assert scored.member_tests[strong.id] == "fruit-b"
    rebuilt._splits["fruit-b"] = replace(rebuilt.splits("fruit-b"), test=[])  # too few: its domain's test set
    fallback = build_report(
        rebuilt, eval_size=4, progress=False, out_dir=tmp_path / "r2", where={"variant": "strong"}
    )
    assert fallback.member_tests[strong.id] == "fruit"
