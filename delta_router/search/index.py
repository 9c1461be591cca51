"""ModelIndex: a FAISS index of Delta Activations embeddings with a JSON metadata sidecar.

Vectors are L2-normalised, so inner product = cosine similarity. Kinds:

- ``flat`` (default): exact search, ``IndexIDMap2(IndexFlatIP)``.
- ``hnsw``: approximate, for large zoos. FAISS HNSW cannot remove vectors, so a removal
  rebuilds the graph from the stored vectors on the next search (costly for huge zoos).
- ``ivf``: approximate, trained on the vectors present when the index is (re)built; a removal
  also triggers a rebuild.

On disk, a directory holds ``meta.json`` (format version, embedding space, entries, tags) and one
``data-<sha>.npz`` (raw vectors + serialized FAISS index). ``save`` writes the data file first and
then replaces ``meta.json`` atomically, so a crash mid-save leaves the previous index intact.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from delta_router.embedding.embedder import Embedding, EmbeddingSpace
from delta_router.errors import (
    DuplicateModelError,
    IndexFormatError,
    SpaceMismatchError,
    UnknownModelError,
)
from delta_router.home import atomic_write_bytes, atomic_write_text, sha256_file
from delta_router.model_ids import check_model_id

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_KINDS = ("flat", "hnsw", "ivf")
META_FILE = "meta.json"


@dataclass
class IndexEntry:
    """One indexed model: its embedding record and free-form tags (domain, task, license...)."""

    faiss_id: int
    embedding: Embedding
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return self.embedding.model_id


@dataclass
class SearchHit:
    rank: int  # 1-based
    model_id: str
    score: float  # cosine similarity in [-1, 1]
    entry: IndexEntry


def _normalised(vectors: np.ndarray) -> np.ndarray:
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12))


class ModelIndex:
    """Add, remove, update and search finetune embeddings of one embedding space."""

    def __init__(
        self,
        space: EmbeddingSpace | None = None,
        kind: str = "flat",
        hnsw_m: int = 32,
        ivf_nlist: int | None = None,
    ) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        self.space = space
        self.kind, self.hnsw_m, self.ivf_nlist = kind, hnsw_m, ivf_nlist
        self._entries: dict[str, IndexEntry] = {}
        self._next_id = 0
        self._faiss: faiss.Index | None = None  # built lazily from the entries

    # ---- container protocol ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def get(self, model_id: str) -> IndexEntry:
        try:
            return self._entries[model_id]
        except KeyError:
            raise UnknownModelError(f"no model {model_id!r} in the index") from None

    def list(self) -> list[IndexEntry]:
        return sorted(self._entries.values(), key=lambda e: e.model_id)

    def filtered(self, keep: Callable[[IndexEntry], bool]) -> ModelIndex:
        """A new in-memory index of the entries for which ``keep(entry)`` holds (same kind)."""
        out = ModelIndex(self.space, self.kind, self.hnsw_m, self.ivf_nlist)
        for entry in self.list():
            if keep(entry):
                out.add(entry.embedding, entry.tags)
        return out

    # ---- mutation ------------------------------------------------------------------------------
    def add(self, embedding: Embedding, tags: dict[str, str] | None = None, replace: bool = False):
        """Add one embedding. Refuses an invalid id (``model_ids``), another space, and an existing
        id unless ``replace``."""
        check_model_id(embedding.model_id)
        self._check_space(embedding.space, f"model {embedding.model_id!r}")
        if embedding.model_id in self._entries:
            if not replace:
                raise DuplicateModelError(
                    f"model {embedding.model_id!r} is already in the index "
                    "(use replace=True / --replace to overwrite it)"
                )
            old = self._entries[embedding.model_id]
            tags = {**old.tags, **(tags or {})}
            self.remove(embedding.model_id)
        entry = IndexEntry(self._next_id, embedding, dict(tags or {}))
        self._next_id += 1
        self._entries[embedding.model_id] = entry
        if self._faiss is not None:
            self._faiss.add_with_ids(_normalised(embedding.vector), np.array([entry.faiss_id]))
        return entry

    def remove(self, model_id: str) -> IndexEntry:
        entry = self.get(model_id)
        del self._entries[model_id]
        if self._faiss is not None:
            if self.kind == "flat":
                self._faiss.remove_ids(np.array([entry.faiss_id], dtype=np.int64))
            else:  # HNSW cannot remove; IVF renumbers unlike IndexIDMap2 expects: rebuild lazily
                self._faiss = None
        return entry

    def update(
        self, model_id: str, embedding: Embedding | None = None, tags: dict[str, str] | None = None
    ) -> IndexEntry:
        """Replace the embedding and/or merge new tags (a tag set to ``""`` is deleted)."""
        entry = self.get(model_id)
        if embedding is not None:
            if embedding.model_id != model_id:
                raise ValueError(f"embedding is for {embedding.model_id!r}, not {model_id!r}")
            entry = self.add(embedding, replace=True)
        for key, value in (tags or {}).items():
            if value == "":
                entry.tags.pop(key, None)
            else:
                entry.tags[key] = value
        return entry

    def _check_space(self, space: EmbeddingSpace, what: str) -> None:
        if self.space is None:
            self.space = space
        else:
            self.space.check_same(space, "index", what)

    # ---- search --------------------------------------------------------------------------------
    def search(
        self, query: Embedding | np.ndarray, k: int = 5, exclude: set[str] | None = None
    ) -> list[SearchHit]:
        """The ``k`` most similar models to ``query`` (an Embedding or a ``[dim]`` vector)."""
        if isinstance(query, Embedding):
            self._check_space(query.space, f"query {query.model_id!r}")
            vector = query.vector
        else:
            vector = np.asarray(query, dtype=np.float32).reshape(-1)
            if self.space is not None and vector.shape[0] != self.space.dim:
                raise SpaceMismatchError(f"query has dimension {vector.shape[0]}, the index {self.space.dim}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        exclude = exclude or set()
        if not self._entries:
            return []
        index = self._index()
        want = min(k + len(exclude), len(self._entries))
        scores, ids = index.search(_normalised(vector), want)
        by_id = {e.faiss_id: e for e in self._entries.values()}
        hits = []
        for score, fid in zip(scores[0], ids[0], strict=True):
            entry = by_id.get(int(fid))
            if entry is None or entry.model_id in exclude:
                continue
            hits.append(SearchHit(len(hits) + 1, entry.model_id, float(score), entry))
            if len(hits) == k:
                break
        return hits

    def _index(self) -> faiss.Index:
        if self._faiss is None:
            self._faiss = self._build()
        return self._faiss

    def _build(self) -> faiss.Index:
        entries = list(self._entries.values())
        dim = self.space.dim if self.space else entries[0].embedding.vector.shape[0]
        vectors = _normalised(np.stack([e.embedding.vector for e in entries]))
        ids = np.array([e.faiss_id for e in entries], dtype=np.int64)
        if self.kind == "flat":
            inner = faiss.IndexFlatIP(dim)
        elif self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        else:
            nlist = max(1, min(self.ivf_nlist or int(4 * np.sqrt(len(entries))), len(entries)))
            quantizer = faiss.IndexFlatIP(dim)
            inner = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            inner.train(vectors)
            inner.nprobe = min(nlist, 8)
        index = faiss.IndexIDMap2(inner)  # faiss keeps `inner` alive (referenced_objects)
        index.add_with_ids(vectors, ids)
        return index

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write the index to ``directory`` atomically (see the module docstring)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        entries = self.list()
        arrays = {"vectors": np.zeros((0, self.space.dim if self.space else 0), np.float32)}
        if entries:
            arrays["vectors"] = np.stack([e.embedding.vector for e in entries]).astype(np.float32)
            arrays["faiss"] = faiss.serialize_index(self._index())
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        digest = hashlib.sha256(buf.getbuffer()).hexdigest()
        data_name = f"data-{digest[:16]}.npz"
        atomic_write_bytes(directory / data_name, buf.getvalue())
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "params": {"hnsw_m": self.hnsw_m, "ivf_nlist": self.ivf_nlist},
            "space": self.space.to_dict() if self.space else None,
            "next_id": self._next_id,
            "data_file": data_name,
            "data_sha256": digest,
            "entries": [
                {"faiss_id": e.faiss_id, "tags": e.tags, "embedding": e.embedding.to_dict(False)}
                for e in entries
            ],
        }
        atomic_write_text(directory / META_FILE, json.dumps(meta, indent=1))
        for stale in directory.glob("data-*.npz"):
            if stale.name != data_name:
                stale.unlink()
        logger.info("saved %d models to %s", len(entries), directory)
        return directory

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        return (Path(directory) / META_FILE).is_file()

    @classmethod
    def load(cls, directory: str | Path) -> ModelIndex:
        directory = Path(directory)
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise IndexFormatError(f"{directory} is not a model index (no {META_FILE})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            json.dumps(meta, ensure_ascii=False).encode("utf-8")  # no lone surrogates ("\ud800") to print
            version = int(meta["format_version"])
        except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
            # ValueError: bad UTF-8 or JSON or Unicode too; RecursionError: nested too deep;
            # OverflowError: int(Infinity)
            raise IndexFormatError(f"{meta_path}: corrupt index metadata ({exc!r})") from exc
        if version > FORMAT_VERSION:
            raise IndexFormatError(
                f"{directory} was written by a newer delta-router (index format {version}; this "
                f"version reads up to {FORMAT_VERSION}). Upgrade delta-router to read it."
            )
        try:
            return cls._from_meta(directory, meta)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
            raise IndexFormatError(f"{meta_path}: corrupt index metadata ({exc!r})") from exc

    @classmethod
    def _from_meta(cls, directory: Path, meta: dict) -> ModelIndex:
        import dataclasses
        from reprlib import repr as short  # messages stay one short line whatever the file holds

        from delta_router.models.base import BaseFingerprint

        meta_path = directory / META_FILE

        def corrupt(detail: str) -> IndexFormatError:
            return IndexFormatError(f"{meta_path}: corrupt index metadata ({detail})")

        def check(data: object, kind: type, where: str) -> None:
            """``data`` is an object whose str/int fields have the types of ``kind``'s fields."""
            if not isinstance(data, dict):
                raise corrupt(f"{where} is {short(data)}, not a JSON object")
            for item in dataclasses.fields(kind):  # annotations are strings (postponed evaluation)
                expected = {"str": str, "int": int}.get(item.type)
                value = data.get(item.name)
                if expected and item.name in data and (type(value) is not expected):
                    raise corrupt(f"{where}.{item.name} is {short(value)}, not {item.type}")

        def check_space(data: object, where: str) -> None:
            check(data, EmbeddingSpace, where)
            check(data.get("base"), BaseFingerprint, f"{where}.base")

        data_file = meta["data_file"]
        if not isinstance(data_file, str) or Path(data_file).name != data_file:
            raise corrupt(f"data_file {short(data_file)} is not a file name in {directory}")
        data_path = directory / data_file
        if not data_path.is_file() or sha256_file(data_path) != meta["data_sha256"]:
            raise IndexFormatError(f"{data_path}: missing or corrupt (checksum mismatch)")
        space = None
        if meta["space"]:
            check_space(meta["space"], "space")
            space = EmbeddingSpace.from_dict(meta["space"])
        params = meta["params"]
        if not isinstance(params, dict) or not all(
            (type(v) is int and v > 0) or (k == "ivf_nlist" and v is None) for k, v in params.items()
        ):
            raise corrupt(f"params {short(params)} are not positive integers")
        index = cls(space, meta["kind"], **params)
        next_id = meta["next_id"]
        if type(next_id) is not int or not 0 <= next_id < 2**63:  # faiss ids are int64
            raise corrupt(f"next_id {short(next_id)} is not a faiss id")
        index._next_id = next_id
        with np.load(data_path) as data:
            vectors = data["vectors"]
            if len(vectors) != len(meta["entries"]):
                raise IndexFormatError(
                    f"{data_path}: {len(vectors)} vectors for {len(meta['entries'])} entries in {META_FILE}"
                )
            faiss_ids = set()
            for row, item in enumerate(meta["entries"]):
                check(item, IndexEntry, f"entries[{row}]")
                check(item["embedding"], Embedding, f"entries[{row}].embedding")
                check_space(item["embedding"].get("space"), f"entries[{row}].embedding.space")
                tags = item["tags"]
                if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
                    raise corrupt(f"entries[{row}].tags {short(tags)} are not string tags")
                embedding = Embedding.from_dict(item["embedding"], vector=vectors[row].copy())
                if embedding.space != space or embedding.vector.shape != (space.dim,):
                    raise corrupt(
                        f"entries[{row}] ({short(embedding.model_id)}) is not in the index's embedding "
                        "space, or its vector has another dimension"
                    )
                faiss_id = item["faiss_id"]
                if (
                    embedding.model_id in index._entries
                    or faiss_id in faiss_ids
                    or not 0 <= faiss_id < next_id
                ):
                    raise corrupt(
                        f"entries[{row}] ({short(embedding.model_id)}, faiss id {faiss_id}) repeats a model "
                        "id or a faiss id, or its faiss id is not in 0..next_id-1"
                    )
                faiss_ids.add(faiss_id)
                index._entries[embedding.model_id] = IndexEntry(faiss_id, embedding, dict(tags))
            if "faiss" in data:
                index._faiss = faiss.deserialize_index(data["faiss"])
        return index
