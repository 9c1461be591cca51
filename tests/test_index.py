"""ModelIndex: round trips, search semantics, tag filters, appends, concurrent writers, crashes,
format and space checks, migration of format 1."""

from __future__ import annotations

import dataclasses
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from delta_router import DeltaEmbedder, ModelIndex
from delta_router.errors import (
    DuplicateModelError,
    IndexFormatError,
    SpaceMismatchError,
    UnknownModelError,
)
from delta_router.search import index as index_module
from delta_router.testing import write_v1_index


@pytest.fixture()
def embeddings(tiny_base, adapters):
    return DeltaEmbedder(tiny_base, progress=False).embed(adapters)


def random_embeddings(template, n: int, seed: int = 0, prefix: str = "m"):
    """``n`` embeddings in ``template``'s space with random vectors (ids ``{prefix}-{i}``)."""
    vectors = np.random.default_rng(seed).standard_normal((n, template.vector.shape[0])).astype(np.float32)
    return [dataclasses.replace(template, vector=vectors[i], model_id=f"{prefix}-{i}") for i in range(n)]


@pytest.mark.parametrize("kind", ["auto", "flat", "hnsw", "ivf"])
def test_round_trip_save_load_search_remove(embeddings, tmp_path, kind):
    index = ModelIndex(kind=kind)
    for i, emb in enumerate(embeddings):
        index.add(emb, tags={"domain": "even" if i % 2 == 0 else "odd"})
    hits = index.search(embeddings[2], k=3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].model_id == embeddings[2].model_id
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False))

    index.save(tmp_path / "idx")
    loaded = ModelIndex.load(tmp_path / "idx")
    assert len(loaded) == len(embeddings) and loaded.kind == kind
    assert [(h.model_id, round(h.score, 5)) for h in loaded.search(embeddings[2], k=3)] == [
        (h.model_id, round(h.score, 5)) for h in hits
    ]
    assert loaded.get(embeddings[1].model_id).tags == {"domain": "odd"}
    np.testing.assert_array_equal(loaded.get(embeddings[1].model_id).embedding.vector,
                                  embeddings[1].vector)  # fmt: skip
    assert hits[0].entry.embedding.path == embeddings[2].path

    loaded.remove(embeddings[2].model_id)
    assert embeddings[2].model_id not in loaded
    after = loaded.search(embeddings[2], k=10)
    assert embeddings[2].model_id not in [h.model_id for h in after]
    assert len(after) == len(embeddings) - 1
    loaded.save(tmp_path / "idx")
    reloaded = ModelIndex.load(tmp_path / "idx")
    assert len(reloaded) == len(embeddings) - 1
    assert embeddings[2].model_id not in [h.model_id for h in reloaded.search(embeddings[2], k=10)]


def test_k_larger_than_index_and_exclude(embeddings):
    index = ModelIndex()
    for emb in embeddings:
        index.add(emb)
    assert len(index.search(embeddings[0], k=100)) == len(embeddings)
    hits = index.search(embeddings[0], k=2, exclude={embeddings[0].model_id})
    assert len(hits) == 2 and embeddings[0].model_id not in [h.model_id for h in hits]
    assert ModelIndex().search(embeddings[0].vector, k=3) == []
    with pytest.raises(ValueError, match="k must be"):
        index.search(embeddings[0], k=0)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_tag_filters_return_k_matching_hits(embeddings, kind):
    index = ModelIndex(kind=kind)
    for i, emb in enumerate(random_embeddings(embeddings[0], 60)):
        index.add(emb, tags={"domain": ["math", "law", "code"][i % 3], "license": "mit" if i < 30 else "gpl"})
    query = random_embeddings(embeddings[0], 1, seed=9, prefix="q")[0]
    hits = index.search(query, k=5, where={"domain": "math", "license": "mit"})
    assert len(hits) == 5 and all(h.entry.tags == {"domain": "math", "license": "mit"} for h in hits)
    exact = ModelIndex(kind="flat")
    for entry in index.list():
        if entry.tags == {"domain": "math", "license": "mit"}:
            exact.add(entry.embedding)
    assert [h.model_id for h in hits] == [h.model_id for h in exact.search(query, k=5)]
    assert index.search(query, k=5, where={"domain": "chemistry"}) == []


def test_batched_search_equals_one_at_a_time(embeddings):
    index = ModelIndex(kind="flat")
    for emb in random_embeddings(embeddings[0], 30):
        index.add(emb)
    queries = random_embeddings(embeddings[0], 4, seed=3, prefix="q")
    batched = index.search_many(queries, k=3)
    assert [[h.model_id for h in hits] for hits in batched] == [
        [h.model_id for h in index.search(q, k=3)] for q in queries
    ]
    matrix = np.stack([q.vector for q in queries])
    assert [[h.model_id for h in hits] for hits in index.search_many(matrix, k=3)] == [
        [h.model_id for h in hits] for hits in batched
    ]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_add_many_equals_adding_one_at_a_time_and_commits_only_on_save(embeddings, tmp_path, kind):
    models = random_embeddings(embeddings[0], 40)
    tags = [{"shard": str(i % 3)} for i in range(40)]
    one_by_one, bulk = ModelIndex(kind=kind), ModelIndex(kind=kind)
    for emb, tag in zip(models, tags, strict=True):
        one_by_one.add(emb, tag)
    entries = bulk.add_many(models[:30], tags[:30])
    bulk.add_many(models[30:], tags[30:])  # extends the structure the first call built
    assert [e.model_id for e in entries] == [m.model_id for m in models[:30]]
    assert bulk._faiss is not None and bulk._faiss.ntotal == 40
    queries = random_embeddings(embeddings[0], 5, seed=7, prefix="q")
    for query in queries:
        got = [h.model_id for h in bulk.search(query, k=5, where={"shard": "1"})]
        assert got == [h.model_id for h in one_by_one.search(query, k=5, where={"shard": "1"})]
    bulk.save(tmp_path / "idx")
    loaded = ModelIndex.load(tmp_path / "idx")
    loaded.add_many(random_embeddings(embeddings[0], 3, seed=1, prefix="late"))
    loaded.close()  # not saved: nothing of it lands
    again = ModelIndex.load(tmp_path / "idx")
    assert len(again) == 40 and again.get("m-7").tags == {"shard": "1"}


def test_add_many_is_all_or_nothing(embeddings):
    models = random_embeddings(embeddings[0], 4)
    index = ModelIndex()
    index.add(models[0])
    with pytest.raises(DuplicateModelError, match="m-0"):
        index.add_many(models[1:] + [models[0]])
    with pytest.raises(DuplicateModelError, match="m-2"):
        index.add_many([models[1], models[2], models[2]])
    with pytest.raises(ValueError, match="tag sets"):
        index.add_many(models[1:], [{}])
    assert index.model_ids() == ["m-0"] and len(index.list()) == 1
    index.add_many(models[1:])
    assert index.model_ids() == ["m-0", "m-1", "m-2", "m-3"]


def test_auto_kind_switches_to_a_graph_past_its_threshold(embeddings, monkeypatch):
    monkeypatch.setattr(index_module, "AUTO_APPROXIMATE_AT", 10)
    index = ModelIndex()
    models = random_embeddings(embeddings[0], 12)
    for emb in models[:9]:
        index.add(emb)
    assert index.structure == "flat" and index.search(models[0], k=1)[0].model_id == models[0].model_id
    for emb in models[9:]:
        index.add(emb)
    assert index.structure == "hnsw" and index.search(models[11], k=1)[0].model_id == models[11].model_id


def test_an_append_keeps_the_graph_and_a_reload_sees_it(embeddings, tmp_path):
    models = random_embeddings(embeddings[0], 41)
    index = ModelIndex(kind="hnsw")
    for emb in models[:40]:
        index.add(emb)
    index.save(tmp_path / "idx")
    graph = tmp_path / "idx" / index_module.GRAPH_FILE
    written = graph.stat().st_mtime_ns

    loaded = ModelIndex.load(tmp_path / "idx")
    loaded.add(models[40], tags={"new": "yes"})
    loaded.remove(models[0].model_id)
    loaded.save(tmp_path / "idx")
    assert graph.stat().st_mtime_ns == written  # 1 of 40 out of date: the graph is not rewritten

    again = ModelIndex.load(tmp_path / "idx")
    assert again.search(models[40], k=1)[0].model_id == models[40].model_id
    assert models[0].model_id not in [h.model_id for h in again.search(models[0], k=5)]
    assert again.get(models[40].model_id).tags == {"new": "yes"}


def test_duplicate_id_needs_replace(embeddings):
    index = ModelIndex()
    index.add(embeddings[0], tags={"domain": "math"})
    with pytest.raises(DuplicateModelError, match="replace"):
        index.add(embeddings[0])
    moved = embeddings[1]
    moved.model_id = embeddings[0].model_id
    index.add(moved, tags={"license": "mit"}, replace=True)
    entry = index.get(moved.model_id)
    assert len(index) == 1 and entry.tags == {"domain": "math", "license": "mit"}
    np.testing.assert_array_equal(entry.embedding.vector, moved.vector)


def test_update_tags_and_unknown_ids(embeddings):
    index = ModelIndex()
    index.add(embeddings[0], tags={"domain": "math", "task": "gsm8k"})
    index.update(embeddings[0].model_id, tags={"task": "", "license": "apache-2.0"})
    assert index.get(embeddings[0].model_id).tags == {"domain": "math", "license": "apache-2.0"}
    with pytest.raises(UnknownModelError, match="nope"):
        index.remove("nope")


def test_refuses_other_probe_sets_naming_both(tiny_base, adapters, embeddings):
    index = ModelIndex()
    index.add(embeddings[0])
    other = DeltaEmbedder(tiny_base, probes=["Hello there."], progress=False)
    with pytest.raises(SpaceMismatchError) as err:
        index.add(other.embed_one(adapters[1]))
    assert "paper" in str(err.value) and "custom" in str(err.value)
    foreign = other.embed_one(adapters[1])
    foreign.model_id = embeddings[0].model_id
    with pytest.raises(SpaceMismatchError):
        index.add(foreign, replace=True)
    assert index.model_ids() == [embeddings[0].model_id]  # the entry it would replace is still there
    with pytest.raises(SpaceMismatchError):
        index.search(other.embed_one(adapters[1]))
    with pytest.raises(SpaceMismatchError, match="dimension"):
        index.search(np.ones(3))


def test_refuses_another_base(other_base, tmp_path, embeddings):
    from delta_router.testing import RandomAdapterFactory

    adapter = RandomAdapterFactory(other_base).make(tmp_path / "a", seed=0, scale=0.1)
    foreign = DeltaEmbedder(other_base, progress=False).embed_one(adapter)
    index = ModelIndex()
    index.add(embeddings[0])
    with pytest.raises(SpaceMismatchError, match="base"):
        index.add(foreign)


# ---- on disk: writers, crashes, formats --------------------------------------------------------
WRITER = """
import dataclasses, sys, numpy as np
from delta_router import ModelIndex
directory, prefix, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rng = np.random.default_rng(seed)
for i in range(n):
    index = ModelIndex.load(directory)
    template = index.list()[0].embedding
    vector = rng.standard_normal(template.vector.shape[0]).astype(np.float32)
    index.add(dataclasses.replace(template, vector=vector, model_id=f"{prefix}-{i}"), tags={"by": prefix})
    index.save(directory)
    print(i, flush=True)
"""


def _writer(directory, prefix: str, n: int, seed: int) -> subprocess.Popen:
    argv = [sys.executable, "-c", textwrap.dedent(WRITER), str(directory), prefix, str(n), str(seed)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_adding_to_one_index_both_land(embeddings, tmp_path):
    index = ModelIndex()
    index.add(embeddings[0])
    index.save(tmp_path / "idx")
    writers = [_writer(tmp_path / "idx", prefix, 15, seed) for seed, prefix in enumerate(("a", "b"))]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    loaded = ModelIndex.load(tmp_path / "idx")
    assert len(loaded) == 31
    assert {e.tags.get("by") for e in loaded.list()} == {None, "a", "b"}


def test_kill_9_mid_write_leaves_a_loadable_index(embeddings, tmp_path):
    index = ModelIndex()
    index.add(embeddings[0])
    index.save(tmp_path / "idx")
    writer = _writer(tmp_path / "idx", "k", 10_000, 0)
    for _ in range(5):  # let it commit a few, then kill it in the middle of the next ones
        writer.stdout.readline()
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)
    loaded = ModelIndex.load(tmp_path / "idx")
    assert len(loaded) >= 6
    assert loaded.search(loaded.get("k-0").embedding, k=1)[0].model_id == "k-0"


def test_future_format_and_corruption_are_refused(embeddings, tmp_path):
    index = ModelIndex()
    index.add(embeddings[0])
    index.save(tmp_path / "idx")
    db_path = tmp_path / "idx" / index_module.DB_FILE
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'format_version'")
    with pytest.raises(IndexFormatError, match="newer delta-router"):
        ModelIndex.load(tmp_path / "idx")
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE meta SET value = '{oops' WHERE key = 'space'")
    with pytest.raises(IndexFormatError, match="corrupt"):
        ModelIndex.load(tmp_path / "idx")
    db_path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(IndexFormatError, match="corrupt"):
        ModelIndex.load(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="not a model index"):
        ModelIndex.load(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_read_only_index_is_searched_and_refuses_changes(embeddings, tmp_path, monkeypatch, kind):
    index = ModelIndex(kind=kind)
    index.add_many(embeddings[:3])
    index.save(tmp_path / "idx")
    index.close()

    def files():  # SQLite's side files come and go with readers (a writable test directory)
        return {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir() if "-" not in p.name}

    before = files()
    # no write permission (tests run as root, which chmod cannot stop): what os.access reports
    monkeypatch.setattr(index_module.os, "access", lambda path, mode: mode != index_module.os.W_OK)
    loaded = ModelIndex.load(tmp_path / "idx")
    assert loaded.read_only and len(loaded) == 3
    assert loaded.search(embeddings[1], k=1)[0].model_id == embeddings[1].model_id
    for change in (
        lambda: loaded.add(embeddings[3]),
        lambda: loaded.remove(embeddings[0].model_id),
        lambda: loaded.update(embeddings[0].model_id, tags={"a": "b"}),
        lambda: loaded.save(tmp_path / "idx"),
    ):
        with pytest.raises(IndexFormatError, match="read-only"):
            change()
    assert len(loaded) == 3
    loaded.close()
    assert files() == before


def test_saving_over_another_index_is_refused(embeddings, tmp_path):
    for i in range(2):
        index = ModelIndex()
        index.add(embeddings[i])
        if i == 0:
            index.save(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="already holds an index"):
        index.save(tmp_path / "idx")
    assert [e.model_id for e in ModelIndex.load(tmp_path / "idx").list()] == [embeddings[0].model_id]


def test_format_1_is_refused_with_the_command_then_migrated_once(embeddings, tmp_path, capsys):
    from delta_router.cli import main

    rows = [(emb, {"domain": f"d{i}"}) for i, emb in enumerate(embeddings)]
    old = write_v1_index(tmp_path / "old", rows)
    with pytest.raises(IndexFormatError, match="index migrate --index"):
        ModelIndex.load(old)
    assert main(["index", "migrate", "--index", str(old)]) == 0
    assert not (old / "meta.json").exists() and not list(old.glob("data-*.npz"))
    migrated = ModelIndex.load(old)
    assert [(e.model_id, e.tags) for e in migrated.list()] == sorted(
        ((e.model_id, t) for e, t in rows), key=lambda r: r[0]
    )
    np.testing.assert_array_equal(migrated.get(embeddings[1].model_id).embedding.vector, embeddings[1].vector)
    assert main(["index", "migrate", "--index", str(old)]) == 2
    assert "already in index format" in capsys.readouterr().err


def test_two_first_saves_to_one_directory_keep_the_first(embeddings, tmp_path, monkeypatch):
    first, second = ModelIndex(), ModelIndex()
    first.add(embeddings[0])
    second.add(embeddings[1])
    mkstemp = index_module.tempfile.mkstemp

    def the_other_process_saves_first(*args, **kwargs):
        made = mkstemp(*args, **kwargs)
        monkeypatch.setattr(index_module.tempfile, "mkstemp", mkstemp)
        first.save(tmp_path / "idx")
        return made

    monkeypatch.setattr(index_module.tempfile, "mkstemp", the_other_process_saves_first)
    with pytest.raises(IndexFormatError, match="another process"):
        second.save(tmp_path / "idx")
    assert [e.model_id for e in ModelIndex.load(tmp_path / "idx").list()] == [embeddings[0].model_id]
    assert not [p for p in (tmp_path / "idx").iterdir() if index_module.is_index_temp(p)]


def test_paths_are_every_entrys_path_without_reading_vectors(embeddings, tmp_path):
    index = ModelIndex()
    index.add_many(embeddings)
    index.save(tmp_path / "idx")
    loaded = ModelIndex.load(tmp_path / "idx")
    assert sorted(loaded.paths()) == sorted(e.embedding.path for e in loaded.list())
