"""``zoo report``: does the zoo cluster by domain, and did every finetune learn its domain?

Writes ``report.md``, ``report.json`` and ``tsne.png`` under ``<zoo root>/report/``:
silhouette by domain (cosine distance) of the domain finetunes, with and without the robustness
variants; a nearest-neighbour table; and each domain finetune's held-out score against the base
(multiple-choice accuracy, or answer NLL for free-form domains), on its own dataset's test set where
that has the records (else its domain's). Scores are cached by adapter
content hash, so a second report is seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from delta_router.errors import InvalidModelError
from delta_router.evaluation.clustering import Neighbour, nearest_neighbours, silhouette, tsne_plot
from delta_router.evaluation.scoring import Score, score_records
from delta_router.home import atomic_write_text
from delta_router.models.finetunes import Finetune
from delta_router.search.index import IndexEntry
from delta_router.serialize import from_json, to_json
from delta_router.training.trainer import TrainingRun
from delta_router.zoo.spec import ZooMember
from delta_router.zoo.zoo import Zoo

logger = logging.getLogger(__name__)


@dataclass
class ZooReport:
    """The figures of one zoo report (see module docstring)."""

    zoo: str
    base: str
    silhouette_domain: float
    silhouette_with_robustness: float | None
    neighbours: list[Neighbour]
    base_scores: dict[str, Score] = field(default_factory=dict)
    member_scores: dict[str, Score] = field(default_factory=dict)
    member_domains: dict[str, str] = field(default_factory=dict)
    member_formats: dict[str, str] = field(default_factory=dict)  # prompt format each was trained in
    member_tests: dict[str, str] = field(default_factory=dict)  # the dataset each is scored on
    eval_size: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None

    @property
    def neighbour_accuracy(self) -> float:
        """Fraction of single-domain finetunes whose nearest neighbour shares their domain."""
        rows = [n for n in self.neighbours if "+" not in n.label]
        return sum(n.same_label for n in rows) / max(1, len(rows))

    def base_score(self, member: str) -> Score:
        """The base on the member's test set, prompted in the member's format."""
        fmt = self.member_formats.get(member, "alpaca")
        return self.base_scores[_base_key(self.member_tests[member], fmt)]

    def learned(self) -> dict[str, bool]:
        """Per member: beats the base on its held-out records (both in its format)."""
        return {m: s.main > self.base_score(m).main for m, s in self.member_scores.items()}

    def to_dict(self) -> dict:
        return {
            "zoo": self.zoo,
            "base": self.base,
            "silhouette_domain": self.silhouette_domain,
            "silhouette_with_robustness": self.silhouette_with_robustness,
            "neighbour_accuracy": self.neighbour_accuracy,
            "neighbours": to_json(self.neighbours),
            "eval_size": self.eval_size,
            "base_scores": {d: s.to_dict() for d, s in self.base_scores.items()},
            "member_scores": {m: s.to_dict() for m, s in self.member_scores.items()},
            "test_sets": self.member_tests,
            "learned": self.learned(),
            "seconds": self.seconds,
        }

    def to_markdown(self) -> str:
        lines = [
            f"# Zoo report: {self.zoo} on {self.base}",
            "",
            f"- Silhouette by domain (cosine), domain finetunes: **{self.silhouette_domain:.3f}** "
            "(paper: 0.614 on 8B models)",
        ]
        if self.silhouette_with_robustness is not None:
            lines.append(f"- ... including robustness variants: {self.silhouette_with_robustness:.3f}")
        lines += [
            f"- Nearest neighbour in the same domain: {self.neighbour_accuracy:.0%}",
            "",
            "![t-SNE](tsne.png)",
            "",
            "## Nearest neighbours",
            "",
            "| model | domain | nearest | its domain | cosine |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {n.item} | {n.label} | {n.neighbour} | {n.neighbour_label} | {n.similarity:.3f} |"
            for n in self.neighbours
        ]
        lines += [
            "",
            f"## Held-out scores ({self.eval_size} test records of each finetune's dataset)",
            "",
            "acc = multiple-choice accuracy; free-form domains: answer NLL per token (lower is better). "
            "Each finetune and the base are prompted in the format the finetune was trained in, on the "
            "test set of the finetune's dataset (its domain's where the dataset has too few records).",
            "",
            "| model | domain | test set | format | metric | finetune | base | learned |",
            "|---|---|---|---|---|---|---|---|",
        ]
        learned = self.learned()
        for member, score in self.member_scores.items():
            domain, fmt = self.member_domains[member], self.member_formats.get(member, "alpaca")
            base = self.base_score(member)
            metric, ours, theirs = (
                ("acc", score.acc, base.acc) if score.acc is not None else ("nll", score.nll, base.nll)
            )
            mark = "yes" if learned[member] else "**no**"
            test = self.member_tests[member]
            lines.append(
                f"| {member} | {domain} | {test} | {fmt} | {metric} | {ours:.3f} | {theirs:.3f} | {mark} |"
            )
        lines += ["", "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in self.seconds.items()), ""]
        return "\n".join(lines)


def build_report(
    zoo: Zoo,
    eval_size: int = 64,
    progress: bool = True,
    out_dir: str | Path | None = None,
    where: dict[str, str] | None = None,
) -> ZooReport:
    """Compute and write the report of a built zoo (``zoo.build()`` first), into ``out_dir``
    (default ``<zoo root>/report``). Held-out scores are computed for the domain finetunes whose tags
    match ``where`` (all by default)."""
    clock = time.perf_counter()
    entries = zoo.load_index().list()
    domain_entries = [e for e in entries if e.tags.get("kind") == "domain"]
    robust_entries = [e for e in entries if e.tags.get("kind") in ("domain", "robustness")]
    with_robustness = None
    if len(robust_entries) > len(domain_entries):
        with_robustness = _silhouette(robust_entries)
    out_dir = Path(out_dir) if out_dir else zoo.root / "report"
    report = ZooReport(
        zoo=zoo.spec.name,
        base=zoo.base.describe(),
        silhouette_domain=_silhouette(domain_entries),
        silhouette_with_robustness=with_robustness,
        neighbours=nearest_neighbours(
            np.stack([e.embedding.vector for e in entries]),
            [e.model_id for e in entries],
            [e.tags.get("domain", "?") for e in entries],
        ),
        eval_size=eval_size,
        out_dir=out_dir,
    )
    tsne_plot(
        np.stack([e.embedding.vector for e in entries]),
        [e.tags.get("domain", "?") for e in entries],
        out_dir / "tsne.png",
        f"Delta Activations of the {zoo.spec.name} zoo (t-SNE)",
        names=[e.model_id for e in entries],
    )
    report.seconds["clustering"] = time.perf_counter() - clock

    clock = time.perf_counter()
    scored = [e for e in domain_entries if all(e.tags.get(k) == v for k, v in (where or {}).items())]
    _score_members(zoo, report, scored, eval_size, progress)
    report.seconds["held-out scoring"] = time.perf_counter() - clock
    atomic_write_text(out_dir / "report.json", json.dumps(report.to_dict(), indent=2))
    atomic_write_text(out_dir / "report.md", report.to_markdown())
    return report


def _silhouette(entries: list[IndexEntry]) -> float:
    return silhouette(np.stack([e.embedding.vector for e in entries]), [e.tags["domain"] for e in entries])


def _score_members(zoo: Zoo, report: ZooReport, entries: list[IndexEntry], eval_size: int, progress) -> None:
    """Base and each domain finetune on the first ``eval_size`` test records of its dataset, or of its
    domain where the dataset has fewer (cached), both prompted in the format the finetune was trained
    in (``training.json``; Alpaca if unknown)."""
    from peft import PeftModel

    from delta_router.evaluation.harness import load_for_eval

    cache_file = zoo.root / "scores.json"
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    tokenizer = zoo.base.load_tokenizer()
    model = zoo.base.load_model()
    max_length = zoo.spec.train.max_length
    members = {m.id: m for m in zoo.spec.members()}
    for entry in entries:
        report.member_tests[entry.model_id] = _test_set(zoo, members[entry.model_id], eval_size)
    tests = {t: zoo.splits(t).test[:eval_size] for t in set(report.member_tests.values())}
    test_hash = {t: hashlib.sha256(repr(r).encode()).hexdigest()[:12] for t, r in tests.items()}

    def cached_score(key: str, fmt: str, scorer) -> Score:
        key = key if fmt == "alpaca" else f"{key}:{fmt}"
        if key not in cache:
            cache[key] = scorer().to_dict()
            atomic_write_text(cache_file, json.dumps(cache, indent=2))
        return from_json(Score, cache[key])

    for entry in entries:
        domain = entry.tags["domain"]
        report.member_domains[entry.model_id] = domain
        report.member_formats[entry.model_id] = _prompt_format(entry.embedding.path)
    for test, fmt in sorted({(report.member_tests[m], f) for m, f in report.member_formats.items()}):
        report.base_scores[_base_key(test, fmt)] = cached_score(
            f"base:{zoo.base.fingerprint.id}:{test_hash[test]}",
            fmt,
            lambda r=tests[test], f=fmt: score_records(
                model, tokenizer, r, max_length, progress=progress, prompt_format=f
            ),  # fmt: skip
        )
    peft_model = None
    for entry in entries:
        test, fmt = report.member_tests[entry.model_id], report.member_formats[entry.model_id]

        def score(entry=entry, records=tests[test], fmt=fmt) -> Score:
            nonlocal peft_model
            logger.info("scoring %s on %d test records", entry.model_id, len(records))
            if Finetune.open(entry.embedding.path).kind == "full":
                scored = load_for_eval(entry.embedding.path, zoo.base)[0]
            else:
                name = entry.model_id
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(model, entry.embedding.path, adapter_name=name)
                else:
                    previous = peft_model.active_adapter
                    peft_model.load_adapter(entry.embedding.path, adapter_name=name)
                    peft_model.set_adapter(name)
                    peft_model.delete_adapter(previous)
                scored = peft_model
            return score_records(scored, tokenizer, records, max_length, progress=progress, prompt_format=fmt)

        key = f"{entry.embedding.content_hash}:{test_hash[test]}"
        report.member_scores[entry.model_id] = cached_score(key, fmt, score)


def _test_set(zoo: Zoo, member: ZooMember, eval_size: int) -> str:
    """The data source a finetune is scored on: its dataset's if that holds ``eval_size`` test
    records (an extra dataset's: those after its training thirds), else its domain's."""
    [domain] = member.domains
    source = zoo.spec.source(member, domain)
    return source if len(zoo.splits(source).test) >= eval_size else domain


def _prompt_format(path: str | Path) -> str:
    """The prompt format a finetune was trained in, from its ``training.json`` (Alpaca if none)."""
    try:
        return TrainingRun.read(path).config.prompt_format
    except (OSError, InvalidModelError):
        return "alpaca"


def _base_key(domain: str, fmt: str) -> str:
    return domain if fmt == "alpaca" else f"{domain} ({fmt})"
