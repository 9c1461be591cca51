"""Index format 1 (``meta.json`` + ``data-<sha>.npz``): read only, to migrate it to the SQLite format.

``read_v1`` validates every field it reads (a corrupt or hand-edited file is an
``IndexFormatError`` naming it, never a crash); ``ModelIndex.migrate`` writes the new format.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from reprlib import repr as short  # messages stay one short line whatever the file holds

import numpy as np

from delta_router.embedding.embedder import Embedding, EmbeddingSpace
from delta_router.errors import IndexFormatError
from delta_router.home import sha256_file
from delta_router.models.base import BaseFingerprint

META_FILE = "meta.json"
VERSION = 1


@dataclass
class V1Index:
    """What a format-1 directory holds: its kind and parameters, space, and (embedding, tags) rows."""

    kind: str
    params: dict
    space: EmbeddingSpace | None
    rows: list[tuple[Embedding, dict[str, str]]]
    files: list[Path]  # meta.json and the data file


def read_v1(directory: Path) -> V1Index:
    """Read and validate a format-1 index directory."""
    meta_path = directory / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        json.dumps(meta, ensure_ascii=False).encode("utf-8")  # no lone surrogates ("\ud800") to print
        version = int(meta["format_version"])
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
        # ValueError: bad UTF-8 or JSON or Unicode too; RecursionError: nested too deep;
        # OverflowError: int(Infinity)
        raise IndexFormatError(f"{meta_path}: corrupt index metadata ({exc!r})") from exc
    if version != VERSION:
        raise IndexFormatError(f"{meta_path}: index format {version}, expected {VERSION}")
    try:
        return _read(directory, meta)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
        raise IndexFormatError(f"{meta_path}: corrupt index metadata ({exc!r})") from exc


def _read(directory: Path, meta: dict) -> V1Index:
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
    if meta["kind"] not in ("flat", "hnsw", "ivf"):
        raise corrupt(f"kind {short(meta['kind'])} is not flat, hnsw or ivf")
    rows, seen = [], set()
    with np.load(data_path) as data:
        vectors = data["vectors"]
        if len(vectors) != len(meta["entries"]):
            raise IndexFormatError(
                f"{data_path}: {len(vectors)} vectors for {len(meta['entries'])} entries in {META_FILE}"
            )
        for row, item in enumerate(meta["entries"]):
            if not isinstance(item, dict):
                raise corrupt(f"entries[{row}] is {short(item)}, not a JSON object")
            check(item["embedding"], Embedding, f"entries[{row}].embedding")
            check_space(item["embedding"].get("space"), f"entries[{row}].embedding.space")
            tags = item["tags"]
            if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
                raise corrupt(f"entries[{row}].tags {short(tags)} are not string tags")
            embedding = Embedding.from_dict(item["embedding"], vector=vectors[row].astype(np.float32))
            if embedding.space != space or embedding.vector.shape != (space.dim,):
                raise corrupt(
                    f"entries[{row}] ({short(embedding.model_id)}) is not in the index's embedding "
                    "space, or its vector has another dimension"
                )
            if embedding.model_id in seen:
                raise corrupt(f"entries[{row}] repeats the model id {short(embedding.model_id)}")
            seen.add(embedding.model_id)
            rows.append((embedding, dict(tags)))
    return V1Index(meta["kind"], params, space, rows, [meta_path, data_path])
