"""ModelIndex: Delta Activations embeddings searched with FAISS, their metadata kept in SQLite.

Vectors are L2-normalised, so inner product = cosine similarity. Kinds:

- ``auto`` (default): exact while the index holds fewer than ``AUTO_APPROXIMATE_AT`` models (an
  exact query then reads at most ~23 MB: a few ms on 2 cores), HNSW from then on.
- ``flat``: exact search, ``IndexIDMap2(IndexFlatIP)``.
- ``hnsw``: approximate, ``IndexHNSWFlat`` (M=32, efSearch 128: recall@10 >= 0.95 measured in
  ``benchmarks/index_scale.py``). FAISS HNSW cannot remove vectors: a removed model stays in the
  graph, is skipped at search, and the graph is rebuilt once a tenth of it is removed.
- ``ivf``: approximate, ``IndexIVFFlat`` trained on the vectors present when it is (re)built.

On disk a directory holds ``index.sqlite`` (SQLite in WAL mode): the format version, kind and
embedding space (table ``meta``), one row per model with its embedding record and raw float32
vector (``models``), and its tags (``tags``, one row per key). ``add``, ``remove`` and ``update``
run inside one open transaction that ``save`` commits, so a save writes only what changed (an
append, never a rewrite), two processes adding to one index both land (SQLite serialises the
writers), and a crash or ``kill -9`` leaves the last committed index. Approximate kinds also keep
their graph in ``graph.faiss``, a cache: on load, models added since it was written are added to it
and removed ones skipped, and it is rewritten only once it is a tenth out of date.

Tag filters (``search(..., where={"domain": "math"})``) are evaluated in SQL and handed to FAISS as
an ID selector, so the ``k`` hits all match.

Indexes of format 1 (``meta.json`` + ``data-<sha>.npz``) are refused by ``load`` with the command
that migrates them once (``delta-router index migrate``, ``ModelIndex.migrate``); a zoo migrates
its own cached index.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import faiss
import numpy as np

from delta_router import checks
from delta_router.embedding.embedder import Embedding, EmbeddingSpace
from delta_router.embedding.vectors import unit_rows
from delta_router.errors import DuplicateModelError, IndexFormatError, SpaceMismatchError, UnknownModelError
from delta_router.home import atomic_write_bytes, umask
from delta_router.model_ids import check_model_id

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
INDEX_KINDS = ("auto", "flat", "hnsw", "ivf")
AUTO_APPROXIMATE_AT = 10_000
DB_FILE = "index.sqlite"
GRAPH_FILE = "graph.faiss"
LEGACY_META = "meta.json"
STALE_FRACTION = 0.1  # graph rebuilt / rewritten once this share of it is out of date
EXACT_FILTER_AT = 4096  # a tag filter matching at most this many models is searched exactly

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    faiss_id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: a graph on disk may still hold old ids
    model_id TEXT NOT NULL UNIQUE, record TEXT NOT NULL, vector BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS tags (
    faiss_id INTEGER NOT NULL REFERENCES models(faiss_id) ON DELETE CASCADE,
    key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (faiss_id, key)
);
CREATE INDEX IF NOT EXISTS tags_by_value ON tags (key, value);
"""


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
    """One result: ``entry`` (record, vector, tags) is read from the index on first access."""

    rank: int  # 1-based
    model_id: str
    score: float  # cosine similarity in [-1, 1]
    _index: ModelIndex = field(repr=False, compare=False)

    @cached_property
    def entry(self) -> IndexEntry:
        return self._index.get(self.model_id)


class ModelIndex:
    """Add, remove, update and search finetune embeddings of one embedding space.

    ``ModelIndex()`` is a new index in memory; ``ModelIndex.load(dir)`` opens one on disk, and
    ``save(dir)`` commits (same directory) or copies it (another directory).
    """

    def __init__(
        self,
        space: EmbeddingSpace | None = None,
        kind: str = "auto",
        hnsw_m: int = 32,
        ivf_nlist: int | None = None,
        ef_search: int = 128,
    ) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"index kind must be one of {INDEX_KINDS}, got {kind!r}")
        self.space = space
        self.kind, self.hnsw_m, self.ivf_nlist, self.ef_search = kind, hnsw_m, ivf_nlist, ef_search
        self.directory: Path | None = None
        self.read_only = False  # loaded from a directory this process cannot write
        self._db = _connect(":memory:")
        self._lock = threading.RLock()  # one connection, shared by the server's threads
        self._ids: dict[str, int] = {}  # model_id -> faiss_id
        self._names: dict[int, str] = {}  # faiss_id -> model_id
        self._faiss: faiss.Index | None = None  # built lazily from the vectors
        self._dead: set[int] = set()  # in the FAISS index, removed since (approximate kinds)
        self._built_as: str | None = None  # the structure of ``_faiss``
        self._graph_ntotal: int | None = None  # models in graph.faiss, when there is one

    # ---- container protocol ------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._ids

    @property
    def structure(self) -> str:
        """The FAISS structure in use: ``flat``, ``hnsw`` or ``ivf`` (``auto`` resolved by size)."""
        if self.kind != "auto":
            return self.kind
        return "flat" if len(self) < AUTO_APPROXIMATE_AT else "hnsw"

    def model_ids(self) -> list[str]:
        """Every indexed model id, sorted (no database read)."""
        return sorted(self._ids)

    def paths(self) -> list[str]:
        """Where every indexed model's files are (no vectors read: fast at hub scale)."""
        with self._lock:
            records = self._db.execute("SELECT record FROM models").fetchall()
        return [json.loads(record)["path"] for (record,) in records]

    def get(self, model_id: str) -> IndexEntry:
        return self._entries(f"WHERE m.faiss_id = {self._faiss_id(model_id)}")[0]

    def _faiss_id(self, model_id: str) -> int:
        if model_id not in self._ids:
            raise UnknownModelError(f"no model {model_id!r} in the index")
        return self._ids[model_id]

    def list(self) -> list[IndexEntry]:
        """Every entry, sorted by model id (reads the whole table: for listings, not hot paths)."""
        return sorted(self._entries(""), key=lambda e: e.model_id)

    def _entries(self, where: str) -> list[IndexEntry]:
        with self._lock:
            rows = self._db.execute(f"SELECT faiss_id, record, vector FROM models m {where}").fetchall()
            tags: dict[int, dict[str, str]] = {}
            for fid, key, value in self._db.execute(
                f"SELECT t.faiss_id, t.key, t.value FROM tags t JOIN models m USING (faiss_id) {where}"
            ):
                tags.setdefault(fid, {})[key] = value
        return [IndexEntry(fid, self._embedding(fid, rec, vec), tags.get(fid, {})) for fid, rec, vec in rows]

    def _embedding(self, faiss_id: int, record: str, vector: bytes) -> Embedding:
        self._check_vector(vector, faiss_id)
        data = {**json.loads(record), "space": self.space.to_dict()}
        return Embedding.from_dict(data, vector=np.frombuffer(vector, dtype=np.float32).copy())

    def _check_vector(self, blob: bytes, faiss_id: int) -> None:
        if len(blob) != 4 * self.space.dim:  # float32
            name = self._names.get(faiss_id, faiss_id)
            raise IndexFormatError(
                f"{self.directory or 'index'}: the vector of {name!r} is not {self.space.dim} float32 values"
            )

    def filtered(self, keep: Callable[[IndexEntry], bool]) -> ModelIndex:
        """A new in-memory index of the entries for which ``keep(entry)`` holds (same kind)."""
        out = ModelIndex(self.space, self.kind, self.hnsw_m, self.ivf_nlist, self.ef_search)
        kept = [entry for entry in self.list() if keep(entry)]
        out.add_many([entry.embedding for entry in kept], [entry.tags for entry in kept])
        return out

    # ---- mutation (uncommitted until save) -----------------------------------------------------
    def add(self, embedding: Embedding, tags: Mapping[str, str] | None = None, replace: bool = False):
        """Add one embedding. Refuses an invalid id (``model_ids``), another space, and an existing
        id unless ``replace`` (then its tags are kept, updated by ``tags``)."""
        tags = dict(tags or {})
        with self._lock:
            if replace and embedding.model_id in self._ids:
                self._check_space(embedding.space, f"model {embedding.model_id!r}")  # before removing
                tags = {**self.get(embedding.model_id).tags, **tags}
                self.remove(embedding.model_id)
            return self.add_many([embedding], [tags])[0]

    def add_many(
        self, embeddings: Sequence[Embedding], tags: Sequence[Mapping[str, str]] | None = None
    ) -> list[IndexEntry]:
        """Add new embeddings (``tags[i]`` for ``embeddings[i]``) in one SQL batch and one FAISS call.

        The bulk path for hub-scale indexes: where the FAISS structure exists, or the index was
        empty, it is extended (or built) here, so the graph of an approximate kind costs its
        construction in this call and ``save`` only writes. All or nothing: an invalid or
        duplicate id (in the batch or the index) or another space adds none of them.
        """
        self._check_writable()
        embeddings = checks.sources(embeddings, "embeddings")
        for embedding in embeddings:
            if not isinstance(embedding, Embedding):
                raise TypeError(
                    f"the index takes Embeddings (DeltaEmbedder.embed), got {type(embedding).__name__}"
                )
        tags = [checks.string_map(t) for t in tags] if tags is not None else [{} for _ in embeddings]
        if len(tags) != len(embeddings):
            raise ValueError(f"{len(embeddings)} embeddings but {len(tags)} tag sets")
        if not embeddings:
            return []
        names = [e.model_id for e in embeddings]
        for embedding in embeddings:
            check_model_id(embedding.model_id)
            self._check_space(embedding.space, f"model {embedding.model_id!r}")
        if len(set(names)) != len(names):
            raise DuplicateModelError(f"model ids repeat within the batch: {_repeated(names)}")
        vectors = np.stack([np.asarray(e.vector, dtype=np.float32).reshape(-1) for e in embeddings])
        with self._lock:
            clash = [name for name in names if name in self._ids]
            if clash:
                raise DuplicateModelError(
                    f"model {clash[0]!r} is already in the index "
                    "(use replace=True / --replace to overwrite it)"
                )
            was_empty = not self._ids
            if not self._db.in_transaction:
                self._db.execute("BEGIN")  # so that RELEASE below never commits: save does
            self._db.execute("SAVEPOINT add_many")
            try:
                ids = self._insert(embeddings, vectors, tags)
            except BaseException:
                self._db.execute("ROLLBACK TO add_many")
                raise
            finally:
                self._db.execute("RELEASE add_many")
            self._ids.update(zip(names, ids.tolist(), strict=True))
            self._names.update(zip(ids.tolist(), names, strict=True))
            if self._faiss is not None and self.structure != self._built_as:
                self._faiss = None  # auto crossed its threshold: rebuild as the other kind
            if self._faiss is not None:
                self._faiss.add_with_ids(unit_rows(vectors), ids)
            elif was_empty and len(embeddings) > 1:
                self._faiss = self._build(ids, vectors)
        return [IndexEntry(fid, e, t) for fid, e, t in zip(ids.tolist(), embeddings, tags, strict=True)]

    def _insert(self, embeddings: Sequence[Embedding], vectors: np.ndarray, tags: list[dict]) -> np.ndarray:
        """Insert model and tag rows; returns their faiss ids ``[N]``. The first insert takes
        SQLite's write lock, so the ids after it are this transaction's alone."""

        def row(embedding: Embedding, vector: np.ndarray) -> tuple[str, str, bytes]:
            record = embedding.to_dict(with_vector=False)
            del record["space"]
            return embedding.model_id, json.dumps(record), vector.tobytes()

        try:
            first = self._db.execute(
                "INSERT INTO models (model_id, record, vector) VALUES (?, ?, ?)",
                row(embeddings[0], vectors[0]),
            ).lastrowid
            ids = np.arange(first, first + len(embeddings), dtype=np.int64)
            rest = zip(ids[1:].tolist(), embeddings[1:], vectors[1:], strict=True)
            self._db.executemany(
                "INSERT INTO models (faiss_id, model_id, record, vector) VALUES (?, ?, ?, ?)",
                ((fid, *row(e, v)) for fid, e, v in rest),
            )
        except sqlite3.IntegrityError:  # another process added one of them since this index was loaded
            raise DuplicateModelError(
                "a model of this batch was added to the index by another process"
            ) from None
        self._db.executemany(
            "INSERT INTO tags VALUES (?, ?, ?)",
            ((fid, k, v) for fid, t in zip(ids.tolist(), tags, strict=True) for k, v in t.items()),
        )
        return ids

    def remove(self, model_id: str) -> None:
        self._check_writable()
        with self._lock:
            faiss_id = self._faiss_id(model_id)
            del self._ids[model_id], self._names[faiss_id]
            self._db.execute("DELETE FROM models WHERE faiss_id = ?", (faiss_id,))
            if self._faiss is None:
                return
            if self._built_as == "flat":
                self._faiss.remove_ids(np.array([faiss_id], dtype=np.int64))
            else:
                self._dead.add(faiss_id)
                if len(self._dead) > STALE_FRACTION * self._faiss.ntotal:
                    self._faiss = None

    def update(
        self, model_id: str, embedding: Embedding | None = None, tags: Mapping[str, str] | None = None
    ) -> IndexEntry:
        """Replace the embedding and/or merge new tags (a tag set to ``""`` is deleted)."""
        self._check_writable()
        if embedding is not None:
            if embedding.model_id != model_id:
                raise ValueError(f"embedding is for {embedding.model_id!r}, not {model_id!r}")
            self.add(embedding, replace=True)
        faiss_id = self._faiss_id(model_id)
        with self._lock:
            for key, value in (tags or {}).items():
                if value == "":
                    self._db.execute("DELETE FROM tags WHERE faiss_id = ? AND key = ?", (faiss_id, key))
                else:
                    self._db.execute("INSERT OR REPLACE INTO tags VALUES (?, ?, ?)", (faiss_id, key, value))
        return self.get(model_id)

    def _check_space(self, space: EmbeddingSpace, what: str) -> None:
        if self.space is None:
            self.space = space
        else:
            self.space.check_same(space, "index", what)

    # ---- search --------------------------------------------------------------------------------
    def search(
        self,
        query: Embedding | np.ndarray,
        k: int = 5,
        exclude: set[str] | None = None,
        where: Mapping[str, str] | None = None,
    ) -> list[SearchHit]:
        """The ``k`` most similar models to ``query`` (an Embedding or a ``[dim]`` vector), among
        those whose tags match every ``where`` pair."""
        return self._search_units(self._units([query]), k, exclude, where)[0]

    def search_many(
        self,
        queries: Sequence[Embedding] | np.ndarray,
        k: int = 5,
        exclude: set[str] | None = None,
        where: Mapping[str, str] | None = None,
    ) -> list[list[SearchHit]]:
        """``search`` for a batch of queries (Embeddings, or a ``[Q, dim]`` matrix) in one FAISS call."""
        return self._search_units(self._units(list(queries)), k, exclude, where)

    def _search_units(
        self, matrix: np.ndarray, k: int, exclude: set[str] | None, where: Mapping[str, str] | None
    ) -> list[list[SearchHit]]:
        """Search with unit query rows ``[Q, dim]``: the hot path, kept to FAISS plus id look-ups."""
        checks.count(k, "k")
        where = checks.string_map(where, "where")
        exclude = exclude or set()
        if not self._ids:
            return [[] for _ in range(len(matrix))]
        with self._lock:
            index = self._index()
            allowed = self._matching(where)
            want = min(k + len(exclude) + len(self._dead), index.ntotal)
            if allowed is None:
                scores, ids = _search(index, matrix, want)
            elif self._built_as != "flat" and len(allowed) <= EXACT_FILTER_AT:
                scores, ids = self._exact(matrix, allowed, want)  # graphs miss hits of narrow filters
            else:
                scores, ids = _search(index, matrix, want, self._params(allowed))
        names, results = self._names, []
        for row_scores, row_ids in zip(scores.tolist(), ids.tolist(), strict=True):
            hits: list[SearchHit] = []
            for score, fid in zip(row_scores, row_ids, strict=True):
                name = names.get(fid)
                if name is None or name in exclude:
                    continue  # -1 padding, or removed from an approximate graph
                hits.append(SearchHit(len(hits) + 1, name, score, self))
                if len(hits) == k:
                    break
            results.append(hits)
        return results

    def _units(self, queries: Sequence[Embedding | np.ndarray]) -> np.ndarray:
        """Unit query rows ``[Q, dim]``; an Embedding must be of the index's space."""
        rows = []
        for query in queries:
            if isinstance(query, Embedding):
                self._check_space(query.space, f"query {query.model_id!r}")
                query = query.vector
            vector = np.asarray(query, dtype=np.float32).reshape(-1)
            if self.space is not None and vector.shape[0] != self.space.dim:
                raise SpaceMismatchError(f"query has dimension {vector.shape[0]}, the index {self.space.dim}")
            rows.append(vector)
        if not rows:
            return np.zeros((0, self.space.dim if self.space else 0))
        return unit_rows(rows[0][None, :] if len(rows) == 1 else np.stack(rows))

    def _matching(self, where: Mapping[str, str] | None) -> np.ndarray | None:
        """Faiss ids ``[M]`` of the models whose tags match every ``where`` pair (SQL); None: all."""
        if not where:
            return None
        sql = " INTERSECT ".join("SELECT faiss_id FROM tags WHERE key = ? AND value = ?" for _ in where)
        args = [item for pair in where.items() for item in pair]
        return np.array([row[0] for row in self._db.execute(sql, args)], dtype=np.int64)

    def _params(self, allowed: np.ndarray) -> faiss.SearchParameters:
        """FAISS search parameters that only visit ``allowed`` ids."""
        selector = faiss.IDSelectorBatch(allowed)
        inner = faiss.downcast_index(self._faiss.index)
        if self._built_as == "hnsw":
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=self.ef_search)
        elif self._built_as == "ivf":
            params = faiss.SearchParametersIVF(sel=selector, nprobe=inner.nprobe)
        else:
            params = faiss.SearchParameters(sel=selector)
        params.keep_alive = (allowed, selector)  # FAISS holds raw pointers to both
        return params

    def _exact(self, matrix: np.ndarray, allowed: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact inner products of ``matrix`` ``[Q, d]`` with the ``allowed`` models' vectors."""
        if len(allowed) == 0:
            return np.full((len(matrix), 1), -np.inf), np.full((len(matrix), 1), -1)
        vectors = self._faiss.reconstruct_batch(allowed)  # stored normalised
        scores = matrix @ vectors.T
        order = np.argsort(-scores, axis=1, kind="stable")[:, :want]
        return np.take_along_axis(scores, order, axis=1), allowed[order]

    def _index(self) -> faiss.Index:
        if self._faiss is None:
            self._faiss = self._build()
        return self._faiss

    def _build(self, ids: np.ndarray | None = None, vectors: np.ndarray | None = None) -> faiss.Index:
        """A FAISS index of every model's normalised vector, ids = faiss ids (``ids`` ``[N]`` and raw
        ``vectors`` ``[N, dim]`` when the caller holds all of them, else read from the database)."""
        if ids is None:
            ids, vectors = self._vectors()
        self._built_as, self._dead = self.structure, set()
        index = self._empty(self._built_as, vectors)
        index.add_with_ids(unit_rows(vectors), ids)
        logger.info("built a %s index of %d models", self._built_as, len(ids))
        return index

    def _empty(self, structure: str, training: np.ndarray) -> faiss.Index:
        dim = self.space.dim
        if structure == "flat":
            inner = faiss.IndexFlatIP(dim)
        elif structure == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = 80
            inner.hnsw.efSearch = self.ef_search
        else:
            n = len(training)
            nlist = max(1, min(self.ivf_nlist or int(4 * np.sqrt(n)), n))
            inner = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            inner.cp.max_points_per_centroid = 64  # k-means on a sample: minutes, not hours, at 1M
            inner.train(unit_rows(training))
            inner.nprobe = min(nlist, 16)
            inner.make_direct_map()  # reconstruct_batch, for exact search of narrow filters
        return faiss.IndexIDMap2(inner)  # faiss keeps `inner` alive (referenced_objects)

    def _vectors(self, after: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """(faiss ids ``[N]``, raw vectors ``[N, dim]``) of the models with a faiss id above ``after``,
        read row by row into one array (no second copy of every vector in memory)."""
        with self._lock:
            (count,) = self._db.execute("SELECT count(*) FROM models WHERE faiss_id > ?", (after,)).fetchone()
            ids = np.empty(count, dtype=np.int64)
            vectors = np.empty((count, self.space.dim if self.space else 0), dtype=np.float32)
            rows = self._db.execute(
                "SELECT faiss_id, vector FROM models WHERE faiss_id > ? ORDER BY faiss_id", (after,)
            )
            for row, (fid, blob) in enumerate(rows):
                self._check_vector(blob, fid)
                ids[row], vectors[row] = fid, np.frombuffer(blob, dtype=np.float32)
        return ids, vectors

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Commit to ``directory``: the pending changes if the index was loaded from (or last saved
        to) it, else a complete copy (a new index there, or an error if one exists)."""
        directory = Path(directory)
        with self._lock:
            if self.directory is not None and directory.resolve() == self.directory.resolve():
                self._check_writable()
                self._write_meta()
                self._db.commit()
            else:
                self._copy_to(directory)
            self._save_graph()
        logger.info("saved %d models to %s", len(self), directory)
        return directory

    def _copy_to(self, directory: Path) -> None:
        """Write the whole index as a new database in ``directory`` and continue on that copy."""
        if (directory / DB_FILE).exists():
            raise IndexFormatError(f"{directory} already holds an index: load it to change it")
        directory.mkdir(parents=True, exist_ok=True)
        self._write_meta()
        fd, tmp = tempfile.mkstemp(prefix=f".{DB_FILE}.", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            target = _connect(tmp, wal=False)  # one self-contained file to rename into place
            for table, columns in (("meta", 2), ("models", 4), ("tags", 3)):
                rows = self._db.execute(f"SELECT * FROM {table}")  # with this connection's pending rows
                target.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * columns)})", rows)
            target.commit()
            target.close()
            os.chmod(tmp, 0o666 & ~umask())
            try:
                os.link(tmp, directory / DB_FILE)  # unlike a rename, never replaces one made meanwhile
            except FileExistsError:
                raise IndexFormatError(
                    f"{directory} already holds an index (another process made it meanwhile): "
                    "run again to add to it"
                ) from None
            except OSError:  # a file system without hard links: the check above is all there is
                os.replace(tmp, directory / DB_FILE)
        finally:
            for leftover in (Path(tmp), Path(f"{tmp}-journal")):
                leftover.unlink(missing_ok=True)
        self._db.rollback()  # pending changes of an index loaded elsewhere stay with this copy only
        self._db.close()
        self._db, self.directory = _connect(directory / DB_FILE), directory
        self._graph_ntotal = None

    def _check_writable(self) -> None:
        if self.read_only:
            raise IndexFormatError(
                f"{self.directory} is read-only here (no write permission): it can be searched, "
                "not changed; copy it to a writable directory to change it"
            )

    def _write_meta(self) -> None:
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "params": {"hnsw_m": self.hnsw_m, "ivf_nlist": self.ivf_nlist, "ef_search": self.ef_search},
            "space": self.space.to_dict() if self.space else None,
        }
        stored = dict(self._db.execute("SELECT key, value FROM meta"))
        if stored.get("space") not in (None, "null") and self.space is not None:
            EmbeddingSpace.from_dict(json.loads(stored["space"])).check_same(
                self.space, "the index on disk", "this index"
            )
        self._db.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()]
        )

    def _save_graph(self) -> None:
        """Keep ``graph.faiss`` of an approximate index within a tenth of the database."""
        if self.directory is None or self.structure == "flat" or not self._ids:
            return
        self._index()  # a graph is built once, at the first save, so that loads need not build it
        on_disk = self._graph_ntotal
        stale = None if on_disk is None else abs(self._faiss.ntotal - on_disk) + len(self._dead)
        if stale is not None and stale <= STALE_FRACTION * on_disk:  # added, rebuilt smaller, removed
            return
        atomic_write_bytes(self.directory / GRAPH_FILE, faiss.serialize_index(self._faiss).tobytes())
        self._graph_ntotal = self._faiss.ntotal

    @classmethod
    def exists(cls, directory: str | Path) -> bool:
        directory = Path(directory)
        return (directory / DB_FILE).is_file() or (directory / LEGACY_META).is_file()

    @classmethod
    def migrate(cls, directory: str | Path) -> ModelIndex:
        """Convert a format-1 index in ``directory`` to this format, in place and once.

        The new database is written beside the old files and renamed into place; only then are
        ``meta.json`` and the data file removed.
        """
        from delta_router.search.legacy import read_v1

        directory = Path(directory)
        if (directory / DB_FILE).is_file():
            raise IndexFormatError(f"{directory} is already in index format {FORMAT_VERSION}")
        old = read_v1(directory)
        index = cls(old.space, old.kind, **old.params)
        index.add_many([embedding for embedding, _ in old.rows], [tags for _, tags in old.rows])
        index.save(directory)
        for path in old.files:
            path.unlink()
        logger.info("migrated %s (%d models) to index format %d", directory, len(index), FORMAT_VERSION)
        return index

    @classmethod
    def load(cls, directory: str | Path, migrate: bool = False) -> ModelIndex:
        """Open the index in ``directory``; a format-1 index is migrated first if ``migrate``."""
        directory = Path(directory)
        if not (directory / DB_FILE).is_file():
            if not (directory / LEGACY_META).is_file():
                raise IndexFormatError(f"{directory} is not a model index (no {DB_FILE})")
            if not migrate:
                raise IndexFormatError(
                    f"{directory} is an index of format 1: convert it once with "
                    f"`delta-router index migrate --index {directory}`"
                )
            return cls.migrate(directory)
        read_only = not (os.access(directory, os.W_OK) and os.access(directory / DB_FILE, os.W_OK))
        try:
            db = _connect_read_only(directory / DB_FILE) if read_only else _connect(directory / DB_FILE)
        except sqlite3.DatabaseError as exc:
            raise IndexFormatError(f"{directory / DB_FILE}: corrupt index database ({exc})") from exc
        try:
            meta = {key: json.loads(value) for key, value in db.execute("SELECT key, value FROM meta")}
            version = int(meta["format_version"])
        except (sqlite3.DatabaseError, KeyError, TypeError, ValueError, RecursionError) as exc:
            db.close()
            raise IndexFormatError(f"{directory / DB_FILE}: corrupt index database ({exc!r})") from exc
        if version > FORMAT_VERSION:
            db.close()
            raise IndexFormatError(
                f"{directory} was written by a newer delta-router (index format {version}; this "
                f"version reads up to {FORMAT_VERSION}). Upgrade delta-router to read it."
            )
        try:
            space = EmbeddingSpace.from_dict(meta["space"]) if meta["space"] else None
            index = cls(space, meta["kind"], **meta["params"])
            if index.space is None and db.execute("SELECT 1 FROM models LIMIT 1").fetchone():
                raise ValueError("models without an embedding space")
            index._db.close()
            index._db, index.directory, index.read_only = db, directory, read_only
            index._ids = dict(db.execute("SELECT model_id, faiss_id FROM models"))
        except (sqlite3.DatabaseError, KeyError, TypeError, ValueError, AttributeError) as exc:
            db.close()
            raise IndexFormatError(f"{directory / DB_FILE}: corrupt index database ({exc!r})") from exc
        index._names = {fid: name for name, fid in index._ids.items()}
        index._load_graph()
        return index

    def _load_graph(self) -> None:
        """Reuse ``graph.faiss`` when it fits the database: add what is new, skip what was removed."""
        path = self.directory / GRAPH_FILE
        if self.structure == "flat" or not path.is_file():
            return
        try:
            graph = faiss.read_index(str(path))
            stored = faiss.vector_to_array(faiss.downcast_index(graph).id_map)
        except RuntimeError as exc:
            logger.warning("%s is unreadable (%s): rebuilding the graph", path, exc)
            return
        inner = faiss.downcast_index(graph.index)
        structure = "hnsw" if isinstance(inner, faiss.IndexHNSW) else "ivf"
        if structure != self.structure:
            return
        if structure == "hnsw":
            inner.hnsw.efSearch = self.ef_search  # not stored in the file
        dead = set(np.setdiff1d(stored, np.fromiter(self._names, np.int64), assume_unique=True).tolist())
        if len(dead) > STALE_FRACTION * len(stored):
            return
        self._faiss, self._built_as, self._dead = graph, structure, dead
        self._graph_ntotal = graph.ntotal
        ids, vectors = self._vectors(after=int(stored.max()) if len(stored) else -1)
        if len(ids):
            graph.add_with_ids(unit_rows(vectors), ids)

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Drop uncommitted changes and release the database."""
        with self._lock:
            self._db.rollback()
            self._db.close()


def _repeated(names: Sequence[str]) -> str:
    return ", ".join(sorted(name for name, count in Counter(names).items() if count > 1)[:5])


def _search(index: faiss.Index, matrix: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """FAISS search; one query runs on one OpenMP thread (FAISS parallelises over queries, so more
    threads only add their wake-up cost: 2-8x slower single queries measured on 2 cores)."""
    if len(matrix) > 1:
        return index.search(matrix, k, params=params)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return index.search(matrix, k, params=params)
    finally:
        faiss.omp_set_num_threads(threads)


def is_index_temp(path: Path) -> bool:
    """Whether ``path`` is a temp file of a first save (``_copy_to``): what an interrupted one leaves."""
    return path.name.startswith(f".{DB_FILE}.") and (path.name.endswith((".tmp", ".tmp-journal")))


def _connect_read_only(path: Path) -> sqlite3.Connection:
    """A connection that never writes, for an index in a directory this process cannot write to.

    SQLite's read-only mode still needs the WAL's side files (``-shm``) of a WAL database; where the
    directory lacks them and cannot hold them, the file is opened as immutable.
    """
    uri = path.resolve().as_uri()
    try:
        db = sqlite3.connect(f"{uri}?mode=ro", uri=True, check_same_thread=False)
        db.execute("SELECT 1 FROM meta LIMIT 1")
    except sqlite3.OperationalError:
        db = sqlite3.connect(f"{uri}?immutable=1", uri=True, check_same_thread=False)
    return db


def _connect(path: str | Path, wal: bool = True) -> sqlite3.Connection:
    """A connection with the schema; writers wait up to a minute for each other."""
    db = sqlite3.connect(str(path), timeout=60, isolation_level="DEFERRED", check_same_thread=False)
    db.execute("PRAGMA foreign_keys = ON")
    if wal and str(path) != ":memory:":
        db.execute("PRAGMA journal_mode = WAL")
    db.executescript(SCHEMA)
    db.commit()
    return db
