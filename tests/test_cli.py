"""The CLI end to end on the tiny base: embed, index add/list/search/tag/remove/info, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from delta_router.cli import main
from delta_router.testing import snapshot
from delta_router.training.trainer import TrainingRun


def run_json(capsys, *argv: str):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_embed_index_search_flow(tiny_base, adapters, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    out = run_json(capsys, "index", "add", *map(str, adapters[:3]), "--index", idx,
                   "--base", str(tiny_base), "--tag", "domain=math")  # fmt: skip
    assert out["size"] == 3
    # later commands follow the index's base and probes without repeating them
    out = run_json(capsys, "embed", str(adapters[3]), "--index", idx, "--tag", "domain=law")
    assert out["added"] == ["adapter-3"] and out["size"] == 4

    listed = run_json(capsys, "index", "list", "--index", idx)
    assert {row["model_id"]: row["tags"]["domain"] for row in listed}["adapter-3"] == "law"

    hits = run_json(capsys, "index", "search", str(adapters[1]), "--index", idx, "-k", "2")
    assert hits[0]["model_id"] == "adapter-1" and hits[0]["score"] == pytest.approx(1, abs=1e-5)
    hits = run_json(capsys, "index", "search", "--id", "adapter-1", "--index", idx, "-k", "9")
    assert len(hits) == 3 and "adapter-1" not in [h["model_id"] for h in hits]

    tagged = run_json(capsys, "index", "tag", "adapter-0", "--tag", "license=mit", "--index", idx)
    assert tagged["tags"] == {"domain": "math", "license": "mit"}
    assert run_json(capsys, "index", "remove", "adapter-2", "--index", idx)["size"] == 3
    info = run_json(capsys, "index", "info", "--index", idx)
    assert info["models"] == 3 and "paper" in info["space"]

    assert main(["index", "list", "--index", idx]) == 0  # the rich table renders
    assert "adapter-0" in capsys.readouterr().out


def test_an_index_built_with_a_probe_file_works_without_that_file(tiny_base, adapters, tmp_path, capsys):
    probes = tmp_path / "my-probes.json"
    probes.write_text(json.dumps(["Tell me something.", "Write a poem.", "Explain this."]))
    idx = str(tmp_path / "idx")
    run_json(capsys, "index", "add", *map(str, adapters[:3]), "--index", idx,
             "--base", str(tiny_base), "--probes", str(probes))  # fmt: skip
    probes.unlink()  # the index holds the probe texts
    assert run_json(capsys, "embed", str(adapters[3]), "--index", idx)["size"] == 4
    hits = run_json(capsys, "index", "search", str(adapters[1]), "--index", idx, "-k", "1")
    assert hits[0]["model_id"] == "adapter-1"
    examples = tmp_path / "task.jsonl"
    examples.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(6)))
    picked = run_json(capsys, "select", "--index", idx, "--examples", str(examples), "-k", "2",
                      "--method", "activations")  # fmt: skip
    assert len(picked["candidates"]) == 2


def test_an_index_of_a_base_given_by_a_relative_path_works_from_elsewhere(
    tiny_base, adapters, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tiny_base.parent)
    idx = str(tmp_path / "idx")
    run_json(capsys, "index", "add", str(adapters[0]), "--index", idx, "--base", tiny_base.name)
    monkeypatch.chdir(tmp_path)
    assert run_json(capsys, "embed", str(adapters[1]), "--index", idx)["size"] == 2


def test_index_add_into_what_an_interrupted_first_save_left(tiny_base, adapters, tmp_path, capsys):
    idx = tmp_path / "idx"
    idx.mkdir()
    (idx / ".index.sqlite.x1y2.tmp").write_bytes(b"half a database")  # kill -9 during the first save
    (idx / ".index.sqlite.x1y2.tmp-journal").write_bytes(b"")
    out = run_json(capsys, "index", "add", str(adapters[0]), "--index", str(idx), "--base", str(tiny_base))
    assert out["size"] == 1


def test_embed_without_index_writes_vectors(tiny_base, adapters, tmp_path, capsys):
    out_file = tmp_path / "emb.json"
    rows = run_json(capsys, "embed", str(adapters[0]), "--base", str(tiny_base), "--id", "x",
                    "--out", str(out_file))  # fmt: skip
    assert rows[0]["model_id"] == "x"
    assert len(json.loads(out_file.read_text())[0]["vector"]) == 64


def test_duplicate_ids_need_replace(tiny_base, adapters, tmp_path, capsys):
    idx = str(tmp_path / "idx")
    common = ["--index", idx, "--base", str(tiny_base)]
    assert main(["index", "add", str(adapters[0]), *common]) == 0
    assert main(["index", "add", str(adapters[0]), *common]) == 2
    assert "--replace" in capsys.readouterr().err
    assert main(["index", "add", str(adapters[0]), *common, "--replace"]) == 0
    copy = shutil.copytree(adapters[1], tmp_path / "other" / "adapter-1")
    assert main(["index", "add", str(adapters[1]), str(copy), *common]) == 2  # same dir name
    assert "--id" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["index", "list", "--index", "{tmp}/nothing"], "not a model index"),
        (["index", "remove", "ghost", "--index", "{idx}"], "ghost"),
        (["embed", "{tmp}", "--base", "{base}"], "not a PEFT adapter"),
        (["index", "add", "{adapter}", "--index", "{idx}", "--layer", "1"], "different spaces"),
        (["index", "search", "--index", "{idx}"], "either a finetune PATH"),
        (["index", "tag", "adapter-0", "--tag", "oops", "--index", "{idx}"], "KEY=VALUE"),
        (["base", "info", "--base", "no-such/model-anywhere"], "local Hugging Face cache"),
    ],
)
def test_bad_input_is_one_clear_error_line(tiny_base, adapters, tmp_path, capsys, argv, message):
    idx = tmp_path / "idx"
    assert main(["index", "add", str(adapters[0]), "--index", str(idx), "--base", str(tiny_base)]) == 0
    before = snapshot(idx)
    capsys.readouterr()
    fill = {"tmp": tmp_path, "idx": idx, "base": tiny_base, "adapter": adapters[1]}
    assert main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err
    assert snapshot(idx) == before  # nothing lost or half-written


def test_demo_builds_a_zoo_and_finds_each_domain(tiny_base, capsys, monkeypatch):
    from delta_router.testing import SYNTHETIC_WORDS as WORDS
    from delta_router.testing import synthetic_domain
    from delta_router.training.trainer import TrainConfig
    from delta_router.zoo import zoo

    tiny = zoo.ZooSpec("small", tuple(WORDS), parts=2, train_size=24,
                       train=TrainConfig(max_steps=5, batch_size=8, learning_rate=1e-2))  # fmt: skip
    monkeypatch.setitem(zoo.ZOO_SPECS, "small", tiny)
    monkeypatch.setattr(zoo, "load_domain", lambda name, seed: synthetic_domain(name, seed=seed))
    result = run_json(capsys, "demo", "--base", str(tiny_base))
    assert len(result["queries"]) == 4 and result["top1_correct"] == 4
    for query, hits in result["queries"].items():
        assert hits[0][0].split("-")[0] == query.split("-")[0]
    assert set(result["learned"]) == {"fruit-0", "fruit-1", "digits-0", "digits-1"}
    picked = [c["tags"]["domain"] for c in result["build"]["selection"]["candidates"]]
    assert picked[:2] == [tiny.domains[0]] * 2  # 20 examples of the first domain -> its two finetunes
    assert (Path(result["build"]["out_dir"]) / "delta_router.json").exists()
    assert {d: r["target"].split("-")[0] for d, r in result["routes"].items()} == {d: d for d in WORDS}
    again = run_json(capsys, "demo", "--base", str(tiny_base))  # everything cached
    assert again["queries"] == result["queries"]


def test_train_on_a_user_file_and_refuse_unknown_data(tiny_base, tmp_path, capsys):
    rows = [{"question": f"q{i}", "answer": "yes"} for i in range(8)]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run_json(capsys, "train", "--data", str(data), "--column", "instruction=question",
                   "--column", "output=answer", "--out", str(tmp_path / "ad"), "--base", str(tiny_base),
                   "--max-steps", "2")  # fmt: skip
    assert out["steps"] == 2 and (tmp_path / "ad" / "training.json").exists()
    head = run_json(capsys, "train", "--data", str(data), "--column", "instruction=question",
                    "--column", "output=answer", "--out", str(tmp_path / "head"), "--base", str(tiny_base),
                    "--max-steps", "1", "--lora-layers", "1")  # fmt: skip
    assert TrainingRun.read(head["adapter"]).config.lora_layers == 1
    assert main(["train", "--data", "nosuch", "--out", str(tmp_path / "x"), "--base", str(tiny_base)]) == 2
    assert "neither a built-in domain" in capsys.readouterr().err and not (tmp_path / "x").exists()
