"""Bad input gets a clear error naming what is wrong, and nothing is lost."""

from __future__ import annotations

import json
import shutil

import pytest

from delta_router import DeltaEmbedder, ModelIndex, ProbeSet
from delta_router.errors import IncompatibleBaseError, InvalidModelError, InvalidModelIdError, ProbeError
from delta_router.testing import RandomAdapterFactory, make_tiny_base


def test_adapter_of_another_base_names_adapter_and_both_bases(tiny_base, other_base, tmp_path):
    foreign = RandomAdapterFactory(other_base).make(tmp_path / "foreign-adapter", seed=0)
    embedder = DeltaEmbedder(tiny_base, progress=False)
    with pytest.raises(IncompatibleBaseError) as err:
        embedder.embed_one(foreign)
    message = str(err.value)
    assert "foreign-adapter" in message  # the adapter
    assert str(other_base) in message  # the base it was trained on
    assert embedder.base.fingerprint.id in message  # the base it was compared with


def test_full_model_of_another_base_is_refused(tiny_base, other_base):
    with pytest.raises(IncompatibleBaseError, match="hidden"):
        DeltaEmbedder(tiny_base, progress=False).embed_one(other_base)


def test_same_shapes_different_base_is_refused_by_the_index(tiny_base, tmp_path, adapters):
    twin = make_tiny_base(tmp_path / "twin", seed=7)  # same shapes, other weights
    twin_adapter = RandomAdapterFactory(twin).make(tmp_path / "twin-adapter", seed=0, scale=0.1)
    index = ModelIndex()
    index.add(DeltaEmbedder(tiny_base, progress=False).embed_one(adapters[0]))
    from delta_router.errors import SpaceMismatchError

    with pytest.raises(SpaceMismatchError, match="base"):
        index.add(DeltaEmbedder(twin, progress=False).embed_one(twin_adapter))


def test_path_that_is_not_a_model(tiny_base, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    embedder = DeltaEmbedder(tiny_base, progress=False)
    with pytest.raises(InvalidModelError, match="not a PEFT adapter"):
        embedder.embed_one(tmp_path / "notes")
    with pytest.raises(InvalidModelError, match="not a directory"):
        embedder.embed_one(tmp_path / "missing")


def test_corrupt_safetensors(tiny_base, adapters, tmp_path):
    broken = shutil.copytree(adapters[0], tmp_path / "broken")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(InvalidModelError, match="corrupt safetensors"):
        DeltaEmbedder(tiny_base, progress=False).embed_one(broken)


def test_corrupt_full_model_leaves_the_embedder_usable(tiny_base, adapters, tmp_path):
    broken = shutil.copytree(tiny_base, tmp_path / "broken-full")
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    embedder = DeltaEmbedder(tiny_base, cache=False, progress=False)
    before = embedder.embed_one(adapters[0]).vector
    with pytest.raises(InvalidModelError, match="corrupt"):
        embedder.embed_one(broken)
    assert (embedder.embed_one(adapters[0]).vector == before).all()  # base restored


def test_adapter_without_safetensors_weights(tiny_base, adapters, tmp_path):
    legacy = shutil.copytree(adapters[0], tmp_path / "legacy")
    (legacy / "adapter_model.safetensors").unlink()
    with pytest.raises(InvalidModelError, match="safe_serialization"):
        DeltaEmbedder(tiny_base, progress=False).embed_one(legacy)


def test_corrupt_adapter_config(tiny_base, adapters, tmp_path):
    broken = shutil.copytree(adapters[0], tmp_path / "cfg")
    (broken / "adapter_config.json").write_text("{oops")
    with pytest.raises(InvalidModelError, match="corrupt JSON"):
        DeltaEmbedder(tiny_base, progress=False).embed_one(broken)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.json", "[]", "empty"),
        ("empty.jsonl", "\n\n", "empty"),
        ("blank.json", json.dumps(["ok", "   "]), "probe 1 is empty"),
        ("bad.jsonl", '{"text": "fine"}\n{"txt": "typo"}\n', "bad.jsonl:2"),
        ("bad.json", "{not json", "not valid JSON"),
        ("dict.json", '{"a": 1}', "JSON list"),
    ],
)
def test_bad_probe_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ProbeError, match=message):
        ProbeSet.from_file(path)


def test_probe_file_round_trip(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    probes = ProbeSet.resolve(str(path))
    assert probes.texts == ("one", "two") and probes.name == "mine"
    assert probes.fingerprint != ProbeSet.paper().fingerprint
    with pytest.raises(ProbeError, match="does not exist"):
        ProbeSet.resolve(str(tmp_path / "nope.json"))


def test_api_misuse_is_a_type_or_value_error_saying_what_to_pass(tiny_base, adapters, tmp_path):
    """One string is never read as a list of characters; wrong types fail where they enter."""
    import numpy as np

    from delta_router import Merger, Router, TaskSelector
    from delta_router.routing.router import Background, QueryEncoder

    embedder = DeltaEmbedder(tiny_base, progress=False)
    encoder = QueryEncoder.for_model(embedder.model, embedder.tokenizer)
    fingerprint = embedder.base.fingerprint
    router = Router.fit(encoder, fingerprint, {"a": ["one text", "two"], "b": ["three"]})
    merger = Merger(tiny_base, progress=False)

    def routed(model_ids, **options):
        return Router(model_ids, np.ones((len(model_ids), 64)), np.zeros(64), fingerprint, **options)

    index = ModelIndex()
    entry = embedder.embed_one(adapters[0])
    index.add(entry)
    cases = [
        (TypeError, "wrap it in a list", lambda: router.route(encoder, "hello")),
        (TypeError, "wrap it in a list", lambda: encoder("hello world")),
        (TypeError, "examples\\['m'\\]", lambda: Router.fit(encoder, fingerprint, {"m": "hello there"})),
        (TypeError, "dict of model id", lambda: Router.fit(encoder, fingerprint, [["a"]])),
        (TypeError, "wrap it", lambda: embedder.embed(str(adapters[0]))),
        (TypeError, "wrap it", lambda: merger.merge(str(adapters[0]), tmp_path / "m")),
        (TypeError, "ModelIndex.load", lambda: TaskSelector(str(tmp_path))),
        (TypeError, "takes Embeddings", lambda: ModelIndex().add(str(adapters[0]))),
        (TypeError, "where must be a dict", lambda: index.search(entry, where="domain=a")),
        (TypeError, "k must be an int", lambda: index.search(entry, k="3")),
        (TypeError, "tags must map str to str", lambda: ModelIndex().add(entry, tags={"a": {"b": 1}})),
        (ValueError, "top_k must be at least 1", lambda: routed(["a"], top_k=0)),
        (ValueError, "temperature", lambda: routed(["a"], temperature=0)),
        (ValueError, "threshold", lambda: routed(["a"], threshold=5)),
        (ValueError, "coverage is a cosine", lambda: Background(np.ones((1, 64)), coverage=2)),
        (ValueError, "background profiles must be", lambda: Background(np.ones(64))),
        (ValueError, "support is a number of models", lambda: Background(np.ones((1, 64)), support=0)),
        (InvalidModelIdError, "invalid model id", lambda: routed(["../x"])),
        (ValueError, "adapters_per_batch", lambda: DeltaEmbedder(tiny_base, adapters_per_batch=-1)),
    ]
    for i, (error, message, call) in enumerate(cases):
        with pytest.raises(error, match=message):
            call()
            pytest.fail(f"case {i} ({message}) raised nothing")


def test_an_output_another_process_wrote_meanwhile_is_not_replaced(tmp_path):
    from delta_router.errors import OutputExistsError
    from delta_router.home import atomic_directory

    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="another process"), atomic_directory(out) as tmp:
        (tmp / "mine.txt").write_text("this run")
        out.mkdir()  # the other writer finishes first
        (out / "theirs.txt").write_text("the other run")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp directory left


def test_a_cache_home_that_is_a_file_is_one_error_line(tmp_path, monkeypatch, capsys):
    from delta_router.cli import main

    home_file = tmp_path / "home"
    home_file.write_text("not a directory")
    monkeypatch.setenv("DELTA_ROUTER_HOME", str(home_file))
    assert main(["index", "list", "--index", str(tmp_path / "idx")]) == 2
    err = capsys.readouterr().err
    assert "DELTA_ROUTER_HOME" in err and "Traceback" not in err
    assert home_file.read_text() == "not a directory"


def test_written_directories_have_the_usual_permissions(tmp_path):
    import os
    import stat

    from delta_router.home import atomic_directory, umask

    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        fd = os.open(tmp / "sub" / "weights.safetensors", os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    assert stat.S_IMODE((tmp_path / "out" / "sub" / "weights.safetensors").stat().st_mode) == 0o666 & ~umask()
    assert stat.S_IMODE((tmp_path / "out" / "sub").stat().st_mode) == 0o777 & ~umask()


def _dead_pid() -> int:
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_runs_temp_directory_is_removed_by_the_next_run(tmp_path):
    import os

    from delta_router.home import _owner, atomic_directory

    host = _owner().split("@")[1]
    dead = tmp_path / f".out.{_dead_pid()}@{host}.k1ll3d_x.tmp"
    live = tmp_path / f".out.{os.getpid()}@{host}.r4nn1ng_.tmp"  # a run still going: not ours to touch
    elsewhere = tmp_path / f".out.{_dead_pid()}@other-host.r3m0t3__.tmp"
    for leftover in (dead, live, elsewhere):
        (leftover / "model.safetensors").parent.mkdir()
        (leftover / "model.safetensors").write_bytes(b"half a model")
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "model.safetensors").write_bytes(b"a model")
    assert not dead.exists() and live.exists() and elsewhere.exists()
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"a model"


def test_an_output_a_killed_run_moved_aside_is_put_back(tmp_path):
    from delta_router.errors import OutputExistsError
    from delta_router.home import _owner, atomic_directory

    host = _owner().split("@")[1]
    aside = tmp_path / f".out.{_dead_pid()}@{host}.k1ll3d_x.old"  # killed between its two renames
    aside.mkdir()
    (aside / "model.safetensors").write_bytes(b"the previous model")
    with pytest.raises(OutputExistsError, match="already exists"), atomic_directory(tmp_path / "out"):
        pytest.fail("the previous output is back: without --force it is not replaced")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"the previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
