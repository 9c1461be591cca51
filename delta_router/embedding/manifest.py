"""Embedding thousands of finetunes from a manifest: resumable, and one bad item never stops the job.

A manifest is a JSONL file of ``{"path": ..., "id": ..., "tags": {...}}`` objects (``id`` and
``tags`` optional), or a CSV file with a ``path`` column, an optional ``id`` column, and any other
columns as tags. ``embed_manifest`` embeds the items in chunks; with an index it adds each chunk
and commits it as it finishes, so an interrupted job resumes where it stopped: an item whose
content is already indexed under its id is skipped (vectors are also cached by content hash).
Items that cannot be embedded are collected with their reason, never raised.

Chunks run in this process by default, or on Ray (``embedding.ray_jobs``): ``embed_manifest``
takes any ``ChunkRunner``, a function from the chunks to ``(chunk number, results)`` pairs in the
order they finish, each result an ``Embedding`` or the reason its finetune failed.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from delta_router.embedding.embedder import DeltaEmbedder, Embedding
from delta_router.errors import DataError, DeltaRouterError
from delta_router.models.finetunes import Finetune

logger = logging.getLogger(__name__)

ChunkResults = list["Embedding | str"]  # per finetune of a chunk: its embedding or why it failed
ChunkRunner = Callable[[Sequence[Sequence[Finetune]]], Iterator[tuple[int, ChunkResults]]]


@dataclass(frozen=True)
class ManifestItem:
    """One line of a manifest: ``where`` is ``file:line`` for messages."""

    where: str
    path: str
    model_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class ManifestResult:
    """What a manifest run did: embedded, skipped (already indexed) and failed items."""

    embedded: list[Embedding] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failures: list[tuple[ManifestItem, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "embedded": [e.model_id for e in self.embedded],
            "skipped": self.skipped,
            "failed": [{"line": it.where, "path": it.path, "reason": why} for it, why in self.failures],
        }


def read_manifest(path: str | Path) -> list[ManifestItem]:
    """The items of a ``.jsonl`` or ``.csv`` manifest. A malformed file is a ``DataError`` naming
    the line; a bad item (missing file, bad id) is left for ``embed_manifest`` to report."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"manifest {path} does not exist")
    if path.suffix not in (".jsonl", ".csv"):
        raise DataError(f"{path}: a manifest is a .jsonl or .csv file")
    items = []
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            rows = _csv_rows(fh) if path.suffix == ".csv" else _jsonl_rows(fh)
            for line, row in rows:
                items.append(_item(row, f"{path}:{line}"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 ({exc.reason})") from exc
    if not items:
        raise DataError(f"{path}: the manifest is empty")
    return items


def _jsonl_rows(fh):
    for line, text in enumerate(fh, 1):
        if text.strip():
            try:
                yield line, json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{fh.name}:{line}: malformed JSON ({exc.msg}, column {exc.colno})") from exc
            except (ValueError, RecursionError) as exc:  # too deep, too many digits
                raise DataError(f"{fh.name}:{line}: malformed JSON ({exc})") from exc


def _csv_rows(fh):
    reader = csv.DictReader(fh)
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{fh.name}:{reader.line_num}: more cells than the header has columns")
            tags = {k: v for k, v in row.items() if k not in ("path", "id") and v}
            yield reader.line_num, {"path": row.get("path"), "id": row.get("id") or None, "tags": tags}
    except csv.Error as exc:
        raise DataError(f"{fh.name}:{reader.line_num}: malformed CSV ({exc})") from exc


def _item(row: object, where: str) -> ManifestItem:
    if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"]:
        raise DataError(f'{where}: each line needs a "path" (a finetune directory)')
    model_id, tags = row.get("id"), row.get("tags") or {}
    if model_id is not None and not isinstance(model_id, str):
        raise DataError(f"{where}: id must be a string, got {model_id!r}")
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise DataError(f"{where}: tags must be an object of strings")
    return ManifestItem(where, row["path"], model_id, dict(tags))


def embed_manifest(
    embedder: DeltaEmbedder,
    items: list[ManifestItem],
    index=None,
    index_dir: str | Path | None = None,
    progress: bool = True,
    runner: ChunkRunner | None = None,
) -> ManifestResult:
    """Embed every item; add each finished chunk to ``index`` and commit it to ``index_dir``.

    Each item is opened first (a missing or unreadable finetune, a bad or repeated id fails that
    item only); the rest are embedded in chunks of ``embedder.adapters_per_batch`` by ``runner``
    (default: in this process, one chunk after another), and a chunk that fails is retried item by
    item so that only the bad items fail.
    """
    result = ManifestResult()
    ready: list[tuple[ManifestItem, Finetune]] = []
    seen: dict[str, str] = {}
    for item in items:
        try:
            finetune = Finetune.open(item.path, item.model_id)
        except DeltaRouterError as exc:
            result.failures.append((item, str(exc)))
            continue
        if finetune.model_id in seen:
            result.failures.append((item, f"id {finetune.model_id!r} repeats {seen[finetune.model_id]}"))
            continue
        seen[finetune.model_id] = item.where
        if index is not None and finetune.model_id in index:
            if index.get(finetune.model_id).embedding.content_hash == finetune.content_hash:
                result.skipped.append(finetune.model_id)  # done in an earlier run
                continue
            result.failures.append((item, f"id {finetune.model_id!r} is indexed with other content"))
            continue
        ready.append((item, finetune))

    size = embedder.adapters_per_batch
    chunks = [ready[start : start + size] for start in range(0, len(ready), size)]
    run = runner or (lambda finetunes: _in_process(embedder, finetunes))
    with tqdm(total=len(ready), desc="embedding", unit="model", disable=not progress) as bar:
        for number, results in run([[ft for _, ft in chunk] for chunk in chunks]):
            done = []
            for (item, _), outcome in zip(chunks[number], results, strict=True):
                if isinstance(outcome, str):
                    result.failures.append((item, outcome))
                else:
                    done.append((item, outcome))
            if index is not None and done:
                index.add_many([embedding for _, embedding in done], [item.tags for item, _ in done])
                index.save(index_dir)
            result.embedded += [embedding for _, embedding in done]
            bar.update(len(chunks[number]))
    position = {id(item): n for n, item in enumerate(items)}
    result.failures.sort(key=lambda failure: position[id(failure[0])])  # in manifest order
    logger.info("manifest: %d embedded, %d skipped, %d failed", len(result.embedded),
                len(result.skipped), len(result.failures))  # fmt: skip
    return result


def _in_process(
    embedder: DeltaEmbedder, chunks: Sequence[Sequence[Finetune]]
) -> Iterator[tuple[int, ChunkResults]]:
    for number, chunk in enumerate(chunks):
        yield number, embed_chunk(embedder, chunk)


def embed_chunk(embedder: DeltaEmbedder, chunk: Sequence[Finetune]) -> ChunkResults:
    """Each finetune's embedding, or the reason it failed (a failed chunk is retried one by one)."""
    try:
        return list(embedder.embed(list(chunk)))
    except DeltaRouterError as exc:
        if len(chunk) == 1:
            return [str(exc)]
    results: ChunkResults = []
    for finetune in chunk:  # find the bad ones
        try:
            results.append(embedder.embed([finetune])[0])
        except DeltaRouterError as exc:
            results.append(str(exc))
    return results
