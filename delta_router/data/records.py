"""Instruction-tuning records, and reading/writing them as JSONL, CSV or a saved HF dataset."""

from __future__ import annotations

import csv
import json
import reprlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from delta_router.data.templates import PAPER_PREAMBLES, alpaca_prompt, format_prompt
from delta_router.errors import DataError
from delta_router.home import atomic_write_text
from delta_router.serialize import to_json

FIELDS = ("instruction", "input", "output", "choices", "answer")


@dataclass(frozen=True)
class Record:
    """One example: ``instruction`` + ``input`` -> ``output``.

    Multiple-choice examples also carry the option texts (``choices``) and the index of the gold one
    (``answer``); for the built-in domains ``output == choices[answer]``.
    """

    instruction: str
    input: str
    output: str
    choices: tuple[str, ...] | None = None
    answer: int | None = None

    def __post_init__(self) -> None:
        if self.choices is not None and not isinstance(self.choices, tuple):
            object.__setattr__(self, "choices", tuple(self.choices))
        if self.answer is None:
            return
        if isinstance(self.answer, bool) or not isinstance(self.answer, int):
            raise DataError(f"answer must be an integer index into choices, got {self.answer!r}")
        if self.choices is None or not 0 <= self.answer < len(self.choices):
            n = 0 if self.choices is None else len(self.choices)
            raise DataError(f"answer {self.answer} is not an index into the {n} choices")

    def prompt(self, preamble: str = PAPER_PREAMBLES[0]) -> str:
        """The Alpaca prompt of the probes' template (no response text)."""
        return alpaca_prompt(self.instruction, self.input, preamble)

    def formatted(self, prompt_format: str = "alpaca", tokenizer=None) -> str:
        """The prompt in one of ``PROMPT_FORMATS`` ("alpaca" is ``prompt()``; "chat" needs ``tokenizer``)."""
        return format_prompt(self.instruction, self.input, prompt_format, tokenizer)

    def to_dict(self) -> dict:
        """One JSONL row: ``instruction, input, output`` and, for multiple choice, ``choices, answer``."""
        return {key: value for key, value in to_json(self).items() if value is not None}

    @classmethod
    def from_dict(cls, row: object, mapping: dict[str, str] | None = None) -> Record:
        """A record from one row (a dict): the inverse of ``to_dict``.

        The one set of rules by which a row becomes a Record, whoever gives it: ``load_records``
        (user files), the selector's example dicts, the split cache. Fields are read by name, by
        ``mapping``'s column names, or as ``prompt``/``completion``; ``instruction`` and ``output``
        must be present; texts are strings (numbers are converted, other types refused); ``choices``
        is a list of strings (or its JSON, from CSV) and ``answer`` an index into it. Whether a text
        may be blank is the caller's rule (``load_records`` refuses blank ones). ``DataError`` names
        the field.
        """
        if not isinstance(row, dict):
            raise DataError(f"expected a JSON object, got {type(row).__name__}")
        if mapping is None and "instruction" not in row and "prompt" in row and "completion" in row:
            row = {**row, "instruction": row["prompt"], "input": "", "output": row["completion"]}
        mapping = mapping or {}
        columns = {field: mapping.get(field, field) for field in FIELDS}
        taken = set(mapping.values())  # a column mapped to one field is not read as another by its name
        values = {
            field: row[column]
            for field, column in columns.items()
            if column in row and (field in mapping or column not in taken)
        }

        def text(field: str, required: bool) -> str:
            if field not in values:
                if not required:
                    return ""
                present = ", ".join(map(str, row)) or "none"
                raise DataError(
                    f"missing required field {field!r} (column {columns[field]!r}); the row has columns: "
                    f"{present}. Pass a mapping, e.g. {{{field!r}: '<column>'}} "
                    f"(CLI: --column {field}=<column>)"
                )
            value = values[field]
            if value is None:
                return ""
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
            if not isinstance(value, str):
                raise DataError(f"field {field!r} must be a string, got {type(value).__name__}")
            return value

        return cls(
            text("instruction", True),
            text("input", False),
            text("output", True),
            _choices(values.get("choices")),
            _answer(values.get("answer")),
        )


def write_records(path: str | Path, records: Iterable[Record]) -> None:
    """Write ``records`` as JSONL (one ``to_dict`` row per line), atomically."""
    lines = (json.dumps(record.to_dict(), ensure_ascii=False) + "\n" for record in records)
    atomic_write_text(Path(path), "".join(lines))


def load_records(path: str | Path, mapping: dict[str, str] | None = None) -> list[Record]:
    """Read a user dataset: ``.jsonl``, ``.csv``, or a directory written by ``datasets.save_to_disk``.

    ``mapping`` maps our field names (``instruction, input, output, choices, answer``) to the file's
    column names, e.g. ``{"instruction": "question", "output": "answer"}``; unmapped fields use their
    own name. Without a mapping, ``{"prompt", "completion"}`` rows are accepted too (as instruction
    and output). ``instruction`` and a non-empty ``output`` are required; ``input`` defaults to "".
    Errors name the file and the 1-based line (JSONL, CSV) or row (HF dataset).
    """
    path = Path(path)
    unknown = sorted(set(mapping or {}) - set(FIELDS))
    if unknown:
        raise DataError(f"mapping has unknown fields {unknown}; the fields are {', '.join(FIELDS)}")
    if path.is_dir():
        rows = _dataset_rows(path)
    elif not path.is_file():
        raise DataError(f"dataset {path} does not exist")
    elif path.suffix == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix == ".csv":
        rows = _csv_rows(path)
    else:
        raise DataError(
            f"{path}: unsupported dataset format {path.suffix!r}; "
            "give a .jsonl file, a .csv file or a directory saved by datasets.save_to_disk"
        )
    records = [_record_from_row(row, mapping, where) for where, row in rows]
    if not records:
        raise DataError(f"{path}: no records (the dataset is empty)")
    return records


def _jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
                if line.strip():
                    row = json.loads(line)
                    json.dumps(row, ensure_ascii=False).encode("utf-8")  # no lone surrogates ("\ud800")
                    yield f"{path}:{lineno}", row
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 text ({exc.reason} at byte {exc.start})"
                ) from exc
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from exc
            except (ValueError, RecursionError) as exc:  # too deep, too many digits, a lone surrogate
                raise DataError(f"{path}:{lineno}: malformed JSON ({exc})") from exc


CSV_FIELD_LIMIT = 1 << 28  # characters; csv's default (128 KiB) refuses long documents


def _csv_rows(path: Path) -> Iterator[tuple[str, object]]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.DictReader(fh)
        try:
            for row in reader:
                if None in row:  # more cells than header columns
                    raise DataError(f"{path}:{reader.line_num}: more cells than the header has columns")
                yield f"{path}:{reader.line_num}", row
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from exc


def _dataset_rows(path: Path) -> Iterator[tuple[str, object]]:
    from datasets import DatasetDict, load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: not a .jsonl/.csv file or a directory saved by datasets ({exc})") from exc
    if isinstance(dataset, DatasetDict):
        if len(dataset) != 1:
            raise DataError(
                f"{path} holds the splits {', '.join(dataset)}: give one split's directory, "
                f"e.g. {path / next(iter(dataset))}"
            )
        dataset = next(iter(dataset.values()))
    for i, row in enumerate(dataset, 1):
        yield f"{path} row {i}", row


def _record_from_row(row: object, mapping: dict[str, str] | None, where: str) -> Record:
    """``Record.from_dict``, then no blank instruction or output; errors name ``where``."""
    try:
        record = Record.from_dict(row, mapping)
        for field in ("instruction", "output"):
            if not getattr(record, field).strip():
                raise DataError(f"empty {field} (column {(mapping or {}).get(field, field)!r})")
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc
    return record


def _choices(value: object) -> tuple[str, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):  # CSV cells hold a JSON list
        try:
            value = json.loads(value)
        except (ValueError, RecursionError) as exc:  # also too deep, or an integer of too many digits
            raise DataError(f"choices must be a JSON list of strings, got {reprlib.repr(value)}") from exc
    if not isinstance(value, (list, tuple)) or not all(isinstance(c, str) for c in value):
        raise DataError(f"choices must be a list of strings, got {reprlib.repr(value)}")
    return tuple(value)


def _answer(value: object) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        try:
            return int(value)
        except ValueError:  # "²" is a digit to isdigit but not to int; so are 5000 digits
            pass
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise DataError(f"answer must be an integer index into choices, got {reprlib.repr(value)}")
