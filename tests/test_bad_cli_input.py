"""A table of bad command lines: each gets one ``error:`` line, exit status 2, and loses nothing.

Every case runs in a fresh copy of a small workspace (an index of two adapters, a router, a notes
directory, example files); after the command, every file that was there is still there, unchanged.
"""

from __future__ import annotations

import contextlib
import gc
import json
import shutil
import socket
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from delta_router.cli import main
from delta_router.data import write_records
from delta_router.testing import SYNTHETIC_WORDS, snapshot, synthetic_domain


@pytest.fixture(scope="module")
def template(tiny_base, adapters, tmp_path_factory) -> Path:
    """The workspace every case copies: ``idx/``, ``router/``, ``notes/``, examples, adapters."""
    root = tmp_path_factory.mktemp("workspace")
    for i in range(2):
        shutil.copytree(adapters[i], root / f"adapter-{i}")
    adapters_ = [str(root / "adapter-0"), str(root / "adapter-1")]
    assert main(["index", "add", *adapters_, "--index", str(root / "idx"), "--base", str(tiny_base),
                 "--id", "fruit", "--id", "digits"]) == 0  # fmt: skip
    for name in SYNTHETIC_WORDS:
        write_records(root / f"{name}.jsonl", synthetic_domain(name).train[0][:8])
    assert main(["route", "fit", "--index", str(root / "idx"), "--out", str(root / "router"),
                 "--examples", f"fruit={root / 'fruit.jsonl'}", "--examples",
                 f"digits={root / 'digits.jsonl'}"]) == 0  # fmt: skip
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("mine, not the tool's")
    gc.collect()  # close the indexes the commands above opened: closing deletes their -wal files
    return root


# ---- ways to spoil the workspace before a command ----------------------------------------------
def edit_json(path: str, change: Callable[[object], object]) -> Callable[[Path], None]:
    def spoil(root: Path) -> None:
        file = root / path
        file.write_text(json.dumps(change(json.loads(file.read_text()))))

    return spoil


def adapter_config(**changes) -> Callable[[Path], None]:
    return edit_json("adapter-0/adapter_config.json", lambda cfg: {**cfg, **changes})


def sql(statement: str) -> Callable[[Path], None]:
    """Run one SQL statement on the workspace index's database."""

    def spoil(root: Path) -> None:
        with contextlib.closing(sqlite3.connect(root / "idx" / "index.sqlite")) as db:
            db.execute(statement)
            db.commit()

    return spoil


def write(path: str, text: str) -> Callable[[Path], None]:
    return lambda root: (root / path).write_text(text)


def busy_port(root: Path) -> None:
    """Occupy a port for the case (the socket lives as long as the test)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    busy_port.sockets.append(sock)
    (root / "port").write_text(str(sock.getsockname()[1]))


busy_port.sockets = []


def examples_in_notes(root: Path) -> None:
    shutil.copy(root / "fruit.jsonl", root / "notes" / "fruit.jsonl")


def index_in_workspace(root: Path) -> None:
    """An index of this copy's own adapter (the template's index points at the template)."""
    shutil.copytree(root / "idx", root / "idx2")  # its base and settings
    assert main(["index", "add", str(root / "adapter-0"), "--index", str(root / "idx2"), "--id", "here"]) == 0
    gc.collect()  # close the index: closing deletes its -wal file


def free_port(root: Path) -> None:
    with contextlib.closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        (root / "port").write_text(str(sock.getsockname()[1]))


ADD = "index add {root}/adapter-0 --index {root}/idx"
# (case, spoil the workspace, argv with {root}, {port}, a fragment of the one error line)
CASES = [
    ("route fit --out the index it reads", None,
     "route fit --index {root}/idx --examples fruit={root}/fruit.jsonl --out {root}/idx --force",
     "would replace the input"),
    ("route fit --data-free with examples", None,
     "route fit --index {root}/idx --data-free --examples fruit={root}/fruit.jsonl --out {root}/r2",
     "uses no examples"),
    ("route fit --data-free on a reference zoo not built", None,
     "route fit --index {root}/idx --data-free --reference-zoo small --out {root}/r2",
     "zoo build --zoo small"),
    ("route fit --out a non-empty directory", None,
     "route fit --index {root}/idx --examples fruit={root}/fruit.jsonl --out {root}/notes", "--force"),
    ("train --out a non-empty directory", None,
     "train --data {root}/fruit.jsonl --out {root}/notes --max-steps 1", "--force"),
    ("embed --out an index's database", None,
     "embed {root}/adapter-0 --out {root}/idx/index.sqlite", "already exists"),
    ("embed --out a directory", None, "embed {root}/adapter-0 --out {root}/notes --force", "is a directory"),
    ("index add --index a directory of other files", None,
     "index add {root}/adapter-0 --index {root}/notes", "not a model index"),
    ("an id with a dot", None, ADD + " --id lora-v1.5", "invalid model id"),
    ("an id that is a path", None, ADD + " --id ../../x", "invalid model id"),
    ("an empty id", None, "index add {root}/adapter-0 --index {root}/idx --id=", "invalid model id"),
    ("a reserved id", None, ADD + " --id base", "invalid model id"),
    ("adapter config: wrong rank", adapter_config(r=4),
     ADD + " --id other", "r=4"),
    ("adapter config: wrong target modules", adapter_config(target_modules=["k_proj"]),
     ADD + " --id other", "target_modules"),
    ("adapter config: a JSON list", write("adapter-0/adapter_config.json", "[1, 2]"),
     ADD + " --id other", "JSON object"),
    ("adapter config: another PEFT type", adapter_config(peft_type="IA3"),
     ADD + " --id other", "adapter_config.json: peft_type 'IA3' is not supported"),
    ("embed an adapter of another PEFT type", adapter_config(peft_type="LOHA"),
     "embed {root}/adapter-0 --out {root}/vectors.npz", "peft_type 'LOHA' is not supported"),
    ("index database without its space", sql("DELETE FROM meta WHERE key = 'space'"),
     "index list --index {root}/idx", "corrupt index database"),
    ("index database with a vector of another length", sql("UPDATE models SET vector = x'00000000'"),
     "index search --id fruit --index {root}/idx", "vector"),
    ("index database with a string space", sql("""UPDATE meta SET value = '"paper"' WHERE key = 'space'"""),
     "index list --index {root}/idx", "corrupt index database"),
    ("index database that is not SQLite", write("idx/index.sqlite", "not a database" * 100),
     "index info --index {root}/idx", "corrupt index database"),
    ("an index of format 1", lambda root: (root / "idx/index.sqlite").rename(root / "idx/meta.json"),
     "index info --index {root}/idx", "index migrate"),
    ("examples: malformed JSONL line", write("bad.jsonl", '{"instruction": "a", "output": "b"}\n{oops\n'),
     "select --examples {root}/bad.jsonl --index {root}/idx -k 1", "bad.jsonl:2"),
    ("examples: a CSV row longer than its header", write("bad.csv", "instruction,output\na,b,c\n"),
     "select --examples {root}/bad.csv --index {root}/idx -k 1", "bad.csv:2"),
    ("route query --top-k 0", None, "route query hello --router {root}/router --top-k 0", "--top-k"),
    ("index search -k 0", None, "index search --id fruit --index {root}/idx -k 0", "-k"),
    ("select -k -1", None, "select --examples {root}/fruit.jsonl --index {root}/idx -k -1", "-k"),
    ("select --router with the default method", None,
     "select --examples {root}/fruit.jsonl --index {root}/idx -k 1 --router {root}/router",
     "--method queries"),
    ("select by queries without a router", None,
     "select --examples {root}/fruit.jsonl --index {root}/idx -k 1 --method queries", "needs --router"),
    ("select by queries with a directory that is no router", None,
     "select --examples {root}/fruit.jsonl --index {root}/idx -k 1 --method queries --router {root}/idx",
     "not a saved router"),
    ("build with an unknown recipe", None,
     "build --examples {root}/fruit.jsonl --index {root}/idx -k 1 --recipe nope --out {root}/m",
     "no merge recipe"),
    ("build --out the index", None,
     "build --examples {root}/fruit.jsonl --index {root}/idx -k 1 --out {root}/idx --force",
     "would replace the input"),
    ("--kind hnsw on a flat index", None,
     ADD + " --id other --kind hnsw", "new index only"),
    ("index remove of one id twice", None, "index remove fruit fruit --index {root}/idx", "more than once"),
    ("serve on a busy port", busy_port, "serve --index {root}/idx --port {port}", "cannot listen"),
    ("--threshold out of range", None, "route query hi --router {root}/router --threshold 2", "--threshold"),
    ("zoo report --out a directory of other files", None,
     "zoo report --zoo small --out {root}/notes", "no delta-router report wrote"),
    ("ablations --out a directory of other files", None,
     "ablations --zoo small --out {root}/notes", "no delta-router report wrote"),
    ("compare --out a directory of other files", None,
     "compare --zoo small --out {root}/notes", "no delta-router report wrote"),
    ("compare --suite unseen --out a directory of other files", None,
     "compare --zoo small --suite unseen --out {root}/notes", "no delta-router report wrote"),
    ("ablations --out a file", None, "ablations --zoo small --out {root}/fruit.jsonl", "is a file"),
    ("compare on an unknown zoo leaves no report directory", None,
     "compare --zoo nope --out {root}/new/compare", "nope"),
    ("ablations on an unknown zoo leaves no report directory", None,
     "ablations --zoo nope --out {root}/new/ablations", "nope"),
    ("zoo report --where without = leaves no report directory", None,
     "zoo report --zoo small --where novalue --out {root}/new/report", "--where expects KEY=VALUE"),
    ("ablations --reference that is no directory", None,
     "ablations --zoo small --out {root}/new/ablations --reference {root}/missing", "--reference"),
    ("embed --out under a file", None,
     "embed {root}/adapter-0 --out {root}/fruit.jsonl/v.json", "fruit.jsonl is a file, not a directory"),
    ("build --out under a file", None,
     "build --examples {root}/fruit.jsonl --index {root}/idx -k 1 --out {root}/fruit.jsonl/m",
     "fruit.jsonl is a file, not a directory"),
    ("train --column without =", None,
     "train --data {root}/fruit.jsonl --column instruction --out {root}/t", "--column expects KEY=VALUE"),
    ("train on a file without the mapped column", None,
     "train --data {root}/fruit.jsonl --column instruction=task --out {root}/t", "--column instruction="),
    ("embed --manifest --failures an existing file", write("m.jsonl", '{"path": "adapter-0"}\n'),
     "embed --manifest {root}/m.jsonl --index {root}/idx --failures {root}/fruit.jsonl",
     "choose another --failures"),
    ("embed --manifest with a malformed line", write("m.jsonl", '{"path": "adapter-0"}\n{oops\n'),
     "embed --manifest {root}/m.jsonl --index {root}/idx", "m.jsonl:2: malformed JSON (Expecting"),
    ("route query of an empty text", None, "route query --router {root}/router  ", "has no tokens"),
    ("serve --port past 65535", None, "serve --index {root}/idx --port 70000", "at most 65535"),
    ("serve --device that is no device", None,
     "serve --index {root}/idx --device bogus", "not a torch device"),
    ("serve --backend vllm without vLLM", free_port,
     "serve --index {root}/idx --backend vllm --port {port}", "needs vLLM installed"),
    ("train --force --out holding its --data", None,
     "train --data {root}/fruit.jsonl --out {root} --max-steps 1 --force", "would replace the input"),
    ("build --force --out holding its examples", examples_in_notes,
     "build --examples {root}/notes/fruit.jsonl --index {root}/idx -k 1 --out {root}/notes --force",
     "would replace the input"),
    ("build --force --out holding an indexed adapter", index_in_workspace,
     "build --examples {root}/fruit.jsonl --index {root}/idx2 -k 1 --out {root}/adapter-0 --force",
     "would replace the input"),
    ("route fit --force --out holding its examples", examples_in_notes,
     "route fit --index {root}/idx --examples fruit={root}/notes/fruit.jsonl --out {root}/notes --force",
     "would replace the input"),
    ("route fit --reference-zoo without --data-free", None,
     "route fit --index {root}/idx --examples fruit={root}/fruit.jsonl --reference-zoo full --out {root}/r2",
     "only apply with --data-free"),
    ("serve --top-k without a router", None, "serve --index {root}/idx --top-k 2", "give --router"),
    ("data prepare with one unknown name", None, "data prepare sentiment nope", "unknown domain 'nope'"),
    ("a router.json without its base", edit_json("router/router.json", lambda m: {**m, "base": None}),
     "route query hi --router {root}/router", "router.json: missing or malformed"),
    ("a router.json naming a background it lacks",
     edit_json("router/router.json", lambda m: {**m, "background": {"coverage": 0.5, "margin": 0.0}}),
     "route query hi --router {root}/router", "not a saved router"),
    ("a router.json naming reference pairs it lacks",
     edit_json("router/router.json", lambda m: {**m, "reference": {"deltas_kind": "formats", "alpha": 0.01}}),
     "route query hi --router {root}/router", "not a saved router"),
    ("route fit --no-background without --data-free", None,
     "route fit --index {root}/idx --examples fruit={root}/fruit.jsonl --no-background --out {root}/r2",
     "only apply with --data-free"),
    ("route fit --shrinkage without --data-free", None,
     "route fit --index {root}/idx --examples fruit={root}/fruit.jsonl --shrinkage 0.3 --out {root}/r2",
     "only apply with --data-free"),
    ("route fit --data-free --shrinkage 0", None,
     "route fit --index {root}/idx --data-free --shrinkage 0 --out {root}/r2", "must be in (0.0, inf)"),
]  # fmt: skip


@pytest.mark.parametrize("case, spoil, argv, message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_error_line_and_loses_nothing(
    template, tmp_path, capsys, case, spoil, argv, message
):
    root = shutil.copytree(template, tmp_path / "ws")
    if spoil is not None:
        spoil(root)
    before = snapshot(root)
    port = (root / "port").read_text() if (root / "port").exists() else ""
    with _returns() as outcome:
        outcome.code = main(argv.format(root=root, port=port).split(" "))
    err = capsys.readouterr().err
    assert outcome.code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err
    assert snapshot(root) == before  # nothing changed, nothing left behind


class _returns:
    """``main`` returns 2 on our errors; argparse exits 2 on its own: read both the same way."""

    code: int | None = None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is SystemExit:
            self.code = exc.code
            return True
        return False


def test_a_default_id_is_made_to_fit_the_rule(template, tmp_path, capsys):
    root = shutil.copytree(template, tmp_path / "ws")
    shutil.copytree(root / "adapter-0", root / "lora-v1.5")
    assert main(["index", "add", str(root / "lora-v1.5"), "--index", str(root / "idx"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["added"] == ["lora-v1_5"]


def test_force_replaces_only_what_it_names(template, tmp_path, capsys):
    root = shutil.copytree(template, tmp_path / "ws")
    argv = ["route", "fit", "--index", str(root / "idx"), "--examples", f"fruit={root / 'fruit.jsonl'}"]
    assert main([*argv, "--out", str(root / "notes"), "--force", "--json"]) == 0
    assert (root / "notes" / "router.json").exists() and not (root / "notes" / "todo.txt").exists()
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temp or .old directories left beside it


def test_outputs_follow_the_umask(template, tmp_path, capsys):
    import os

    root = shutil.copytree(template, tmp_path / "ws")
    old = os.umask(0o022)
    try:
        out = root / "router2"
        argv = ["route", "fit", "--index", str(root / "idx"), "--examples", f"fruit={root / 'fruit.jsonl'}"]
        assert main([*argv, "--out", str(out), "--json"]) == 0
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert (out / "router.json").stat().st_mode & 0o777 == 0o644


def test_version_and_verbose_after_the_subcommand(template, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and "delta-router" in capsys.readouterr().out
    assert main(["index", "info", "--index", str(template / "idx"), "-v", "--json"]) == 0


def test_a_report_directory_is_claimed_once_and_then_rewritten(tmp_path):
    """New or empty: claimed. Claimed: rewritten by later runs. Someone's files: only with force."""
    from delta_router.errors import OutputExistsError
    from delta_router.home import REPORT_MARKER, claim_report_dir

    claim_report_dir(tmp_path / "new", force=False)
    (tmp_path / "new" / "README.md").write_text("a report")
    assert claim_report_dir(tmp_path / "new", force=False) == tmp_path / "new"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("my notes")
    with pytest.raises(OutputExistsError, match="--force"):
        claim_report_dir(tmp_path / "mine", force=False)
    assert not (tmp_path / "mine" / REPORT_MARKER).exists()
    claim_report_dir(tmp_path / "mine", force=True)
    assert (tmp_path / "mine" / REPORT_MARKER).exists()
    assert (tmp_path / "mine" / "README.md").read_text() == "my notes"  # claiming writes nothing else
