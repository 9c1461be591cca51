"""ModelIndex: round trips, search semantics, atomic saves, format and space checks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from delta_router import DeltaEmbedder, ModelIndex
from delta_router.errors import (
    DuplicateModelError,
    IndexFormatError,
    SpaceMismatchError,
    UnknownModelError,
)


@pytest.fixture()
def embeddings(tiny_base, adapters):
    return DeltaEmbedder(tiny_base, progress=False).embed(adapters)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
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

    loaded.remove(embeddings[2].model_id)
    assert embeddings[2].model_id not in loaded
    after = loaded.search(embeddings[2], k=10)
    assert embeddings[2].model_id not in [h.model_id for h in after]
    assert len(after) == len(embeddings) - 1
    loaded.save(tmp_path / "idx")
    assert len(ModelIndex.load(tmp_path / "idx")) == len(embeddings) - 1
    assert len(list((tmp_path / "idx").glob("data-*.npz"))) == 1  # old data files cleaned up


def test_k_larger_than_index_and_exclude(embeddings):
    index = ModelIndex()
    for emb in embeddings:
        index.add(emb)
    assert len(index.search(embeddings[0], k=100)) == len(embeddings)
    hits = index.search(embeddings[0], k=2, exclude={embeddings[0].model_id})
    assert len(hits) == 2 and embeddings[0].model_id not in [h.model_id for h in hits]
    assert ModelIndex().search(embeddings[0].vector, k=3) == []


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


def test_crash_mid_save_keeps_the_previous_index(embeddings, tmp_path, monkeypatch):
    index = ModelIndex()
    index.add(embeddings[0])
    index.save(tmp_path / "idx")
    index.add(embeddings[1])

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("delta_router.search.index.atomic_write_text", crash)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "idx")
    monkeypatch.undo()
    survivor = ModelIndex.load(tmp_path / "idx")
    assert [e.model_id for e in survivor.list()] == [embeddings[0].model_id]


def test_future_format_and_corruption_are_refused(embeddings, tmp_path):
    index = ModelIndex()
    index.add(embeddings[0])
    index.save(tmp_path / "idx")
    meta_path = tmp_path / "idx" / "meta.json"
    meta = json.loads(meta_path.read_text())

    meta_path.write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="newer delta-router"):
        ModelIndex.load(tmp_path / "idx")

    meta_path.write_text(json.dumps(meta))
    data = tmp_path / "idx" / meta["data_file"]
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(IndexFormatError, match="corrupt"):
        ModelIndex.load(tmp_path / "idx")

    meta_path.write_text("{not json")
    with pytest.raises(IndexFormatError, match="corrupt"):
        ModelIndex.load(tmp_path / "idx")
    with pytest.raises(IndexFormatError, match="not a model index"):
        ModelIndex.load(tmp_path / "missing")
