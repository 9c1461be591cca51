"""Probe prompts: the fixed, generic inputs on which hidden-state shifts are measured.

The paper's probe set is five Alpaca-style templates with a generic task and input. The same
template family renders training examples (``data.templates.alpaca_prompt``), so probes and data
agree.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from delta_router.data.templates import PAPER_PREAMBLES, PROMPT_FORMATS, alpaca_prompt, format_prompt
from delta_router.errors import ProbeError

PAPER_TASK = "Please provide a response."
PAPER_INPUT = "Input."
# Generic (task, input) pairs of the ``plain`` probes: the paper's and two more as generic.
PLAIN_TASKS: tuple[tuple[str, str], ...] = (
    (PAPER_TASK, PAPER_INPUT),
    ("Answer the question.", "Question."),
    ("Continue the text.", "Text."),
)


@dataclass(frozen=True)
class ProbeSet:
    """An ordered, named set of probe texts. ``fingerprint`` identifies the exact texts."""

    name: str
    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.texts:
            raise ProbeError(f"probe set {self.name!r} is empty: give at least one probe text")
        for i, text in enumerate(self.texts):
            if not isinstance(text, str) or not text.strip():
                raise ProbeError(f"probe set {self.name!r}: probe {i} is empty or not a string")

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(list(self.texts)).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.texts)

    @classmethod
    def paper(cls) -> ProbeSet:
        """The paper's 5 templates with task ``Please provide a response.`` and input ``Input.``."""
        texts = tuple(alpaca_prompt(PAPER_TASK, PAPER_INPUT, p) for p in PAPER_PREAMBLES)
        return cls("paper", texts)

    @classmethod
    def formats(cls, formats: Sequence[str] = PROMPT_FORMATS, tokenizer=None) -> ProbeSet:
        """The paper's probes in every prompt format (``PROMPT_FORMATS``; "chat" uses ``tokenizer``):
        for Alpaca the paper's 5 texts, for the others each preamble joined to the paper's task."""
        texts = tuple(
            alpaca_prompt(PAPER_TASK, PAPER_INPUT, p)
            if fmt == "alpaca"
            else format_prompt(f"{p} {PAPER_TASK}", PAPER_INPUT, fmt, tokenizer)
            for fmt in formats
            for p in PAPER_PREAMBLES
        )
        return cls("formats-" + "+".join(formats), texts)

    @classmethod
    def plain(cls) -> ProbeSet:
        """The paper's 5 preambles, each joined to the 3 generic tasks of ``PLAIN_TASKS`` as plain lines
        (``"{preamble} {task}\\n{input}"``): 15 probes in no prompt template, so no finetune's format
        is favoured."""
        texts = tuple(f"{p} {task}\n{given}" for task, given in PLAIN_TASKS for p in PAPER_PREAMBLES)
        return cls("plain", texts)

    @classmethod
    def from_file(cls, path: str | Path) -> ProbeSet:
        """Load probes from ``.json`` (a list of strings) or ``.jsonl`` (``{"text": ...}`` lines)."""
        path = Path(path)
        if not path.is_file():
            raise ProbeError(f"probe file {path} does not exist")
        try:
            content = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ProbeError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        if path.suffix == ".jsonl":
            texts = []
            for lineno, line in enumerate(content.splitlines(), 1):
                if not line.strip():
                    continue
                try:  # ValueError: also numbers past the int/str conversion limit
                    row = json.loads(line)
                    texts.append(row["text"] if isinstance(row, dict) else row)
                except (ValueError, RecursionError, KeyError) as exc:
                    raise ProbeError(
                        f'{path}:{lineno}: expected a JSON object with a "text" field ({exc})'
                    ) from exc
        else:
            try:
                texts = json.loads(content)
            except (ValueError, RecursionError) as exc:
                raise ProbeError(f"{path}: not valid JSON ({exc})") from exc
            if not isinstance(texts, list):
                raise ProbeError(f"{path}: expected a JSON list of probe strings")
        try:
            json.dumps(texts, ensure_ascii=False).encode("utf-8")  # a tokenizer refuses lone surrogates
        except UnicodeEncodeError as exc:
            raise ProbeError(f"{path}: not valid Unicode text ({exc})") from exc
        try:
            return cls(path.stem, tuple(texts))
        except ProbeError as exc:
            raise ProbeError(f"{path}: {exc}") from exc

    @classmethod
    def resolve(cls, spec: str | Path | Sequence[str] | ProbeSet) -> ProbeSet:
        """A built-in name (``"paper"``), a probe file path, a list of texts, or a ProbeSet."""
        if isinstance(spec, ProbeSet):
            return spec
        if isinstance(spec, str) and spec in BUILTIN_PROBE_SETS:
            return BUILTIN_PROBE_SETS[spec]()
        if isinstance(spec, (str, Path)):
            return cls.from_file(spec)
        return cls("custom", tuple(spec))


BUILTIN_PROBE_SETS = {"paper": ProbeSet.paper}
