"""The unseen-task suite on the tiny zoo: the flow, the cache and the report (real data: make unseen)."""

from __future__ import annotations

import json

import pytest

from delta_router.experiments import unseen
from delta_router.experiments.unseen import SuiteConfig, UnseenSuite, write_report
from delta_router.search import selector
from delta_router.testing import SYNTHETIC_WORDS, synthetic_domain
from delta_router.training.trainer import TrainConfig
from delta_router.zoo.zoo import Zoo, ZooSpec

FEW_SHOT = TrainConfig(max_steps=3, batch_size=8, learning_rate=1e-2)


@pytest.fixture()
def suite(tiny_base, tmp_path, monkeypatch):
    spec = ZooSpec("tiny", tuple(SYNTHETIC_WORDS), parts=3, train_size=24, train=FEW_SHOT)
    splits = {name: synthetic_domain(name) for name in SYNTHETIC_WORDS}
    index = Zoo(spec, tiny_base, root=tmp_path / "zoo", progress=False, splits=splits).build()
    monkeypatch.setattr(selector, "FEWSHOT_TRAIN_CONFIG", FEW_SHOT)

    def fake_task(name, seed=0, test_size=200, fewshot_size=20, train_cap=1):  # "digits" stands in
        split = synthetic_domain("digits", n=60, seed=seed + 5)
        split.manifest.update(package="synthetic", version="0", wheel_sha256="-", members=[])
        split.fewshot, split.test = split.test[:fewshot_size], (split.fewshot + split.test)[:test_size]
        return split

    monkeypatch.setattr(unseen, "load_domain", fake_task)
    config = SuiteConfig(k=2, examples=10, held_out=12, seeds=2, screen=4, finalists=2)
    return UnseenSuite(index, config, progress=False)


def test_suite_scores_every_condition_and_reports(suite, tmp_path, monkeypatch):
    result = suite.run_task("sciq")
    acc = result["accuracy"]
    wanted = {"base", "returned (selection prior)", "returned (base prior)", "selected top-k", "task LoRA",
              "task head"}  # fmt: skip
    assert wanted | {"oracle single", "random merge"} <= set(acc)
    assert len(result["random_accuracies"]) == 2 and result["oracle"] in suite.index.model_ids()
    names = [c["name"] for c in result["verification"]["candidates"]]
    assert set(result["returned"].values()) <= set(names) and set(result["candidates_held_out"]) == set(names)
    for interval in acc.values():
        assert interval["low"] <= interval["mean"] <= interval["high"]
    out = write_report([result], tmp_path / "report", "test")
    assert json.loads((out / "results.json").read_text())[0]["task"] == "sciq"
    readme = (out / "README.md").read_text()
    assert "| sciq (n=12)" in readme and "ceiling of the verification" in readme
    header = next(line for line in readme.splitlines() if line.startswith("| task | base"))
    assert "task head" in header
    # results written before the task head had a column still fill it, from the candidates' scores
    older = {**result, "accuracy": {k: v for k, v in acc.items() if k != "task head"}}
    older_row = next(r for r in write_report([older], tmp_path / "older", "test").joinpath("README.md")
                     .read_text().splitlines() if r.startswith("| sciq (n=12)"))  # fmt: skip
    assert older_row == next(r for r in readme.splitlines() if r.startswith("| sciq (n=12)"))
    assert (out / "unseen.png").stat().st_size > 0

    monkeypatch.setattr(unseen, "example_scores", lambda *a, **k: pytest.fail("scored again"))
    assert suite.run_task("sciq")["accuracy"] == acc  # every held-out score comes from the cache


def test_cli_suite_writes_its_report_and_refuses_a_directory_of_other_files(
    suite, tmp_path, capsys, monkeypatch
):
    from delta_router.cli import main
    from delta_router.zoo import zoo as zoo_module

    class BuiltZoo:  # the CLI's Zoo("full") stands for the tiny zoo of the fixture
        def __init__(self, *args, **kwargs):
            pass

        def load_index(self):
            return suite.index

    monkeypatch.setattr(zoo_module, "Zoo", BuiltZoo)
    argv = ["compare", "--suite", "unseen", "--domain", "sciq", "--examples", "10", "--eval-size", "12",
            "--seeds", "2", "-k", "2", "--json"]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "report")]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["task"] == "sciq" and set(row["returned"]) == {"selection", "base"}
    assert (tmp_path / "report" / "README.md").exists()
    boolq = [*argv[:4], "boolq", *argv[5:], "--out", str(tmp_path / "report")]
    assert main(boolq) == 0  # its own report: rewritten, the other task's row kept
    capsys.readouterr()
    rows = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [r["task"] for r in rows] == ["sciq", "boolq"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main([*argv, "--out", str(tmp_path / "mine")]) == 2
    assert (
        "notes.txt" in capsys.readouterr().err and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    )
    assert main([*argv[:4], "nope", *argv[5:], "--out", str(tmp_path / "x")]) == 2
    assert "unknown unseen tasks" in capsys.readouterr().err
    assert main([*argv, "--method", "queries", "--out", str(tmp_path / "y")]) == 2  # not silently ignored
    assert "--method and --router are not used" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()
