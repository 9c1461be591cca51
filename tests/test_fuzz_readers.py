"""Fuzz the file readers with random and mutated inputs (hypothesis).

Every reader of a user file (adapter config, safetensors weights, an index's meta.json, JSONL/CSV
examples, probe files) either reads it or raises a ``DeltaRouterError`` whose message names the
file; the CLI prints exactly one ``error:`` line and returns 2, never a traceback; and nothing on
disk changes. The ``@example`` cases are crashes the fuzzer found (kept as regression tests).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from delta_router import DeltaEmbedder, ModelIndex, ProbeSet
from delta_router.cli import main
from delta_router.data import Record, load_records
from delta_router.data.records import FIELDS
from delta_router.errors import DataError, DeltaRouterError, ProbeError
from delta_router.testing import snapshot

# DELTA_ROUTER_FUZZ=N runs N times the examples, from a random seed; by default the runs are small and
# derandomized, so the suite's result does not change from run to run
SCALE = int(os.environ.get("DELTA_ROUTER_FUZZ", "0"))
FUZZ = dict(
    deadline=None,
    database=None,
    derandomize=not SCALE,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def examples(n: int) -> int:
    return n * max(SCALE, 1)


# ---- JSON values and hostile JSON texts --------------------------------------------------------------
# odd values of every JSON type (deep-copied: mutations must not reach the shared lists and dicts)
ODD = st.sampled_from(
    [None, True, False, 0, -1, 1, 2**31, 2**63, 2**64 + 1, 10**30, 0.5, -0.0, float("nan"), float("inf"),
     float("-inf"), "", " ", "x", "8", "../x", "a\x00b", "all-linear", "(", "*", [], [None], {}, {"": None},
     [[[]]]]
).map(copy.deepcopy)  # fmt: skip
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | ODD
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
# JSON texts the standard library cannot turn into values (deep nesting, integers past the int/str
# conversion limit) or turns into odd ones (infinities, NaN, a lone surrogate, NUL)
RAW = st.sampled_from(
    ["[" * 100_000 + "]" * 100_000, '{"a": ' * 50_000, "[" * 2000, "1" + "0" * 5000, "-" + "9" * 4301,
     "1e999", "-1e999", "Infinity", "NaN", '"\\ud800"', '"\\u0000"']
)  # fmt: skip
PLACEHOLDER = "@@RAW-JSON@@"


def dumps(value: object) -> str:
    """JSON text as the project writes it (``NaN`` and ``Infinity`` included, as ``json`` allows)."""
    return json.dumps(value, indent=1)


def with_raw(text: str, raw: str) -> str:
    """``text`` with the ``PLACEHOLDER`` string replaced by ``raw``, JSON that no value dumps to."""
    return text.replace(json.dumps(PLACEHOLDER), raw, 1)


@st.composite
def mutated_bytes(draw, original: bytes) -> bytes:
    """A few truncations, overwritten bytes, insertions and deletions of ``original``."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "overwrite", "insert", "delete"]))
        at = draw(st.integers(0, len(data)))
        if op == "truncate":
            del data[at:]
        elif op == "overwrite" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at : at + draw(st.integers(1, 16))]
    return bytes(data)


def json_paths(value: object, prefix: tuple = ()) -> list[tuple]:
    paths = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            paths += json_paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            paths += json_paths(child, (*prefix, i))
    return paths


@st.composite
def mutated_json(draw, original: object) -> str:
    """``original`` with 1-3 nodes dropped, replaced, re-typed, wrapped or duplicated, as JSON text."""
    value = copy.deepcopy(original)
    raw = None
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(json_paths(value)))
        op = draw(st.sampled_from(["replace", "retype", "wrap", "drop", "duplicate", "raw"]))
        if not path:  # the root
            value = draw(JSON) if op != "wrap" else [value]
            continue
        parent = value
        for key in path[:-1]:
            parent = parent[key]
        key, old = path[-1], parent[path[-1]]
        if op == "replace":
            parent[key] = draw(JSON)
        elif op == "retype":
            parent[key] = draw(st.sampled_from([str(old), [old], {"value": old}, None, 0, True, 1.5, ""]))
        elif op == "wrap":
            parent[key] = [[old]]
        elif op == "drop":
            del parent[key]
        elif op == "duplicate":
            if isinstance(parent, list):
                parent.append(copy.deepcopy(old))
            else:
                parent[draw(st.text(max_size=6))] = copy.deepcopy(old)
        elif raw is None:
            parent[key], raw = PLACEHOLDER, draw(RAW)
    text = dumps(value)
    return with_raw(text, raw) if raw is not None else text


def json_file_texts(valid: object) -> st.SearchStrategy[bytes]:
    """Bytes of a JSON file: random JSON, mutations of ``valid`` (as values and as bytes), garbage."""
    valid_bytes = dumps(valid).encode()
    return st.one_of(
        JSON.map(lambda v: dumps(v).encode()),
        mutated_json(valid).map(str.encode),
        mutated_bytes(valid_bytes),
        RAW.map(str.encode),
        st.binary(max_size=64),
        st.just(b"\xef\xbb\xbf" + valid_bytes),  # a UTF-8 byte order mark
    )


def fresh_copy(template: Path, dest: Path) -> Path:
    """A copy of ``template`` in a new directory beside ``dest`` for each example. Not removing the
    previous one: an index it held is closed by the garbage collector, which deletes its
    ``-wal`` file whenever it runs."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    return Path(
        shutil.copytree(template, Path(tempfile.mkdtemp(prefix=dest.name, dir=dest.parent)) / dest.name)
    )


def check_cli(argv: list[str], capsys, names: str) -> int:
    """``main(argv)`` returns 0, or 2 with exactly one ``error:`` line naming ``names`` and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if code == 0:
        assert errors == [], err
    else:
        assert code == 2, err
        assert len(errors) == 1 and names in errors[0], err
    return code


def with_examples(name: str, cases: list) -> Callable:
    """``@example(name=case)`` for each case: the inputs that crashed a reader once."""

    def apply(test):
        for case in reversed(cases):
            test = example(**{name: case})(test)
        return test

    return apply


def changed(value: dict, path: tuple, new: object) -> bytes:
    """``value`` (a JSON object) with the node at ``path`` set to ``new`` (or deleted, for ``DROP``)."""
    value = copy.deepcopy(value)
    parent = value
    for key in path[:-1]:
        parent = parent[key]
    if new is DROP:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return dumps(value).encode()


DROP = object()
DEEP = b"[" * 100_000


# ---- 1. adapter_config.json ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def adapter_template(adapters, tmp_path_factory) -> Path:
    return Path(shutil.copytree(adapters[0], tmp_path_factory.mktemp("fuzz-adapter") / "adapter"))


def valid_config(adapter_template: Path) -> dict:
    return json.loads((adapter_template / "adapter_config.json").read_text())


MODULE_NAMES = st.sampled_from(
    ["q_proj", "v_proj", "model.layers.0.self_attn.q_proj", "layers.1.mlp.up_proj", "lm_head", "(", "*",
     ".*", "", "embed_tokens"]
)  # fmt: skip
FIELD_VALUES = {
    "r": st.integers(-2, 2**70) | st.sampled_from([0, 4, 8, 16, 8.0, 8.5, "8"]) | ODD,
    "lora_alpha": st.integers(-2, 2**70) | st.floats() | st.sampled_from(["16", "x", 10**400]) | ODD,
    "target_modules": st.lists(MODULE_NAMES, max_size=4) | MODULE_NAMES | ODD,
    "peft_type": st.sampled_from(["LORA", "lora", "IA3", "ADALORA"]) | ODD,
    "use_dora": st.booleans() | ODD,
    "rank_pattern": st.dictionaries(MODULE_NAMES, st.integers(-1, 20) | ODD, max_size=3) | ODD,
    "alpha_pattern": st.dictionaries(MODULE_NAMES, st.integers(-1, 40) | ODD, max_size=3) | ODD,
    "use_rslora": st.booleans() | ODD,
    "fan_in_fan_out": st.booleans() | ODD,
    "modules_to_save": st.lists(MODULE_NAMES, max_size=2) | ODD,
    "bias": st.sampled_from(["none", "all", "lora_only", "other"]) | ODD,
    "layers_to_transform": st.lists(st.integers(-1, 3), max_size=3) | ODD,
    "layers_pattern": st.sampled_from(["layers", "h"]) | ODD,
    "exclude_modules": st.lists(MODULE_NAMES, max_size=2) | ODD,
    "init_lora_weights": st.booleans() | st.sampled_from(["gaussian", "pissa", "olora"]) | ODD,
    "lora_dropout": st.floats() | ODD,
    "base_model_name_or_path": st.text(max_size=10) | ODD,
    "task_type": st.sampled_from(["CAUSAL_LM", "SEQ_CLS"]) | ODD,
}


@st.composite
def mutated_config(draw, valid: dict) -> bytes:
    """The valid config with a few fields set to random values or types, or removed."""
    config = dict(valid)
    raw = None
    for field in draw(st.lists(st.sampled_from(sorted(FIELD_VALUES)), min_size=1, max_size=3, unique=True)):
        how = draw(st.sampled_from(["value", "value", "json", "drop", "raw"]))
        if how == "value":
            config[field] = draw(FIELD_VALUES[field])
        elif how == "json":
            config[field] = draw(JSON)
        elif how == "drop":
            config.pop(field, None)
        elif raw is None:
            config[field], raw = PLACEHOLDER, draw(RAW)
    text = dumps(config)
    return (with_raw(text, raw) if raw is not None else text).encode()


@st.composite
def adapter_configs(draw, valid: dict) -> bytes:
    return draw(st.one_of(mutated_config(valid), json_file_texts(valid)))


def check_embed(tiny_base: Path, adapter: Path) -> None:
    """Embedding ``adapter`` succeeds or raises a DeltaRouterError naming it; no file changes."""
    before = snapshot(adapter)
    try:
        DeltaEmbedder(tiny_base, progress=False, cache=False).embed_one(adapter)
    except DeltaRouterError as exc:
        assert str(adapter) in str(exc), exc
    assert snapshot(adapter) == before


def config_crashes(valid: dict) -> list[bytes]:
    """Configs that crashed the reader (the comment: the exception before the fix)."""
    return [
        DEEP,  # RecursionError from json.loads
        changed(valid, ("target_modules",), None),  # TypeError in PEFT's module matching
        changed(valid, ("target_modules",), DROP),  # the same
        changed(valid, ("alpha_pattern",), {"q_proj": 0, "(": 0}),  # re.error in PEFT (reference path)
        changed(valid, ("alpha_pattern",), {"*": 0}),  # the same
        changed({**valid, "use_dora": True}, ("init_lora_weights",), 0.5),  # AttributeError in PEFT
        changed({**valid, "use_dora": True}, ("init_lora_weights",), " "),  # ValueError in PEFT
        changed({**valid, "use_dora": True}, ("bias",), float("inf")),  # AttributeError in PEFT
        changed(valid, ("modules_to_save",), ["lm_head"]),  # KeyError in PEFT: no lm_head weights saved
        changed(valid, ("lora_alpha",), 10**400),  # OverflowError from float()
        changed(valid, ("lora_alpha",), "x"),  # ValueError from float()
        changed(valid, ("rank_pattern",), "x"),  # AttributeError: str has no .get
        changed(valid, ("layers_to_transform",), "x"),  # TypeError in PEFT's module matching
        changed(valid, ("target_modules",), "("),  # re.error in PEFT's module matching
        changed(valid, ("task_type",), "\ud800"),  # UnicodeEncodeError printing the CLI's error line
    ]


def test_fuzz_adapter_config(tiny_base, adapter_template, tmp_path):
    @settings(max_examples=examples(60), **FUZZ)
    @given(config=adapter_configs(valid_config(adapter_template)))
    @with_examples("config", config_crashes(valid_config(adapter_template)))
    def run(config: bytes) -> None:
        adapter = fresh_copy(adapter_template, tmp_path / "adapter")
        (adapter / "adapter_config.json").write_bytes(config)
        check_embed(tiny_base, adapter)

    run()


def test_fuzz_adapter_config_cli(tiny_base, adapter_template, tmp_path, capsys):
    @settings(max_examples=examples(15), **FUZZ)
    @given(config=adapter_configs(valid_config(adapter_template)))
    @with_examples("config", config_crashes(valid_config(adapter_template)))
    def run(config: bytes) -> None:
        adapter = fresh_copy(adapter_template, tmp_path / "adapter")
        (adapter / "adapter_config.json").write_bytes(config)
        before = snapshot(adapter)
        check_cli(["embed", str(adapter), "--base", str(tiny_base)], capsys, str(adapter))
        assert snapshot(adapter) == before

    run()


# ---- 2. adapter_model.safetensors ------------------------------------------------------------------------
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "C64": 8}  # fmt: skip
DTYPES = st.sampled_from([*DTYPE_SIZES, "F8_E8M0", "F4", "F6_E2M3", "C128", "f32", "", "X"])
U64 = st.integers(0, 2**64 - 1)


def read_header(weights: bytes) -> dict:
    (length,) = struct.unpack("<Q", weights[:8])
    return json.loads(weights[8 : 8 + length])


def safetensors_bytes(header: dict, data: bytes, length: int | None = None) -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


@st.composite
def consistent_weights(draw, header: dict) -> bytes:
    """A well-formed file of some of the adapter's tensor names (and others), random dtypes and shapes."""
    real = {k: v for k, v in header.items() if k != "__metadata__"}
    names = draw(st.lists(st.sampled_from(sorted(real)), min_size=1, max_size=6, unique=True))
    names += draw(st.lists(st.text(min_size=1, max_size=12), max_size=2))
    out, offset, data = {}, 0, bytearray()
    for name in dict.fromkeys(names):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)) | st.just(real.get(name, {}).get("dtype", "F32")))
        shape = draw(
            st.just(real.get(name, {}).get("shape", [1]))
            | st.lists(st.integers(0, 70), max_size=3)
            | st.sampled_from([[], [0, 64], [8, 0], [64, 8], [8, 64, 1]])
        )
        size = DTYPE_SIZES[dtype]
        for dim in shape:
            size *= dim
        pattern = draw(st.binary(min_size=1, max_size=8))
        data += (pattern * (size // len(pattern) + 1))[:size]
        out[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    return safetensors_bytes(out, bytes(data))


@st.composite
def random_header_weights(draw, header: dict) -> bytes:
    """A length prefix and a JSON header of random dtypes/shapes/offsets, then some bytes."""
    info = st.fixed_dictionaries(
        {"dtype": DTYPES | JSON, "shape": st.lists(st.integers(-2, 2**64), max_size=3) | JSON,
         "data_offsets": st.lists(st.integers(-1, 2**64), max_size=3) | JSON}
    ) | JSON  # fmt: skip
    names = st.sampled_from(sorted(header)) | st.text(max_size=12)
    fake = draw(st.dictionaries(names, info, max_size=4))
    if draw(st.booleans()):
        fake["__metadata__"] = draw(JSON)
    length = draw(st.none() | U64 | st.integers(0, 100))
    return safetensors_bytes(fake, draw(st.binary(max_size=64)), length)


@st.composite
def adapter_weights(draw, weights: bytes) -> bytes:
    header = read_header(weights)
    kind = draw(st.sampled_from(["truncated", "mutated", "random header", "consistent", "bytes"]))
    if kind == "truncated":
        return weights[: draw(st.integers(0, len(weights)))]
    if kind == "mutated":
        return draw(mutated_bytes(weights))
    if kind == "random header":
        return draw(random_header_weights(header))
    if kind == "consistent":
        return draw(consistent_weights(header))
    return draw(st.binary(max_size=64))


def test_fuzz_adapter_weights(tiny_base, adapter_template, tmp_path):
    weights = (adapter_template / "adapter_model.safetensors").read_bytes()

    zero_dim_factor = {"dtype": "BF16", "shape": [], "data_offsets": [0, 2]}
    crashes = [  # IndexError: the config check read the rank of a 0-d lora_A
        safetensors_bytes(
            {"base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": zero_dim_factor}, b"\0\0"
        )
    ]

    @settings(max_examples=examples(60), **FUZZ)
    @given(data=adapter_weights(weights))
    @with_examples("data", crashes)
    def run(data: bytes) -> None:
        adapter = fresh_copy(adapter_template, tmp_path / "adapter")
        (adapter / "adapter_model.safetensors").write_bytes(data)
        check_embed(tiny_base, adapter)

    run()


# ---- 3. an index: the SQLite meta table, and meta.json of format 1 ---------------------------------------
@pytest.fixture(scope="module")
def index_rows(tiny_base, adapters, tmp_path_factory) -> list:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DELTA_ROUTER_HOME", str(tmp_path_factory.mktemp("fuzz-home")))
        embedder = DeltaEmbedder(tiny_base, progress=False, cache=False)
        return [
            (embedder.embed_one(a, model_id=f"model-{i}"), {"domain": f"d{i}"})
            for i, a in enumerate(adapters[:2])
        ]


@pytest.fixture(scope="module")
def index_template(index_rows, tmp_path_factory) -> Path:
    index = ModelIndex()
    for embedding, tags in index_rows:
        index.add(embedding, tags=tags)
    return index.save(tmp_path_factory.mktemp("fuzz-index") / "idx")


def check_loaded(index: ModelIndex) -> None:
    """What the CLI shows of an index must be readable, and searches must work."""
    for entry in index.list():
        assert isinstance(entry.model_id, str) and isinstance(entry.tags, dict)
        entry.embedding.space.describe()
    if len(index):
        first = index.list()[0]
        assert index.search(first.embedding, k=1)[0].model_id == first.model_id
        index.remove(first.model_id)  # in memory only (never saved)
        index.search(first.embedding, k=2)


def test_fuzz_index_meta_table(index_template, tmp_path, capsys):
    """Every value of the ``meta`` table replaced by random JSON (or not JSON at all)."""
    import sqlite3

    from delta_router.search.index import DB_FILE

    with sqlite3.connect(index_template / DB_FILE) as db:
        keys = [row[0] for row in db.execute("SELECT key FROM meta")]

    @settings(max_examples=examples(60), **FUZZ)
    @given(key=st.sampled_from(keys), value=JSON.map(dumps) | st.text(max_size=20))
    def run(key: str, value: str) -> None:
        directory = fresh_copy(index_template, tmp_path / "idx")
        with sqlite3.connect(directory / DB_FILE) as db:
            db.execute("UPDATE meta SET value = ? WHERE key = ?", (value, key))
        before = snapshot(directory)
        try:
            check_loaded(ModelIndex.load(directory))
        except DeltaRouterError as exc:
            assert str(directory) in str(exc), exc
        for command in ("list", "info"):
            check_cli(["index", command, "--index", str(directory)], capsys, str(directory))
        assert snapshot(directory) == before

    run()


def test_fuzz_index_meta_v1(index_rows, tmp_path, capsys):
    """meta.json of a format-1 index: read for migration only, validated field by field."""
    from delta_router.search.legacy import read_v1
    from delta_router.testing import snapshot, write_v1_index

    template = write_v1_index(tmp_path / "v1", index_rows)
    valid = json.loads((template / "meta.json").read_text())
    embedding = ("entries", 0, "embedding")
    crashes = [
        DEEP,  # RecursionError from json.loads
        changed(valid, ("format_version",), float("inf")),  # OverflowError from int()
        changed(valid, (*embedding, "path"), [1]),  # rich's NotRenderableError in `index list`
        changed(valid, (*embedding, "model_id"), None),  # TypeError: sorting the entries by id
        changed(valid, ("space", "base", "weights_hash"), None),  # TypeError: describing the space
        changed(valid, (*embedding, "space", "layer"), 3),  # SpaceMismatchError from a search, not load
        changed(valid, ("entries", 0, "tags"), {"domain": "\ud800"}),  # UnicodeEncodeError in `index list`
    ]

    @settings(max_examples=examples(80), **FUZZ)
    @given(meta=json_file_texts(valid))
    @with_examples("meta", crashes)
    def run(meta: bytes) -> None:
        directory = fresh_copy(template, tmp_path / "idx")
        (directory / "meta.json").write_bytes(meta)
        before = snapshot(directory)
        try:
            read_v1(directory)
        except DeltaRouterError as exc:
            assert str(directory) in str(exc), exc
        assert snapshot(directory) == before
        if check_cli(["index", "migrate", "--index", str(directory)], capsys, str(directory)) == 0:
            check_loaded(ModelIndex.load(directory))
        else:
            assert snapshot(directory) == before  # a refused migration changes nothing

    run()


# ---- 4. JSONL and CSV examples ---------------------------------------------------------------------------
ROW_KEYS = st.sampled_from(["instruction", "input", "output", "choices", "answer", "prompt", "completion"])
# texts that are numbers to Python, but not to int() or json.loads
NUMBERISH = st.sampled_from(["0", " 1 ", "²", "٣", "1" * 5000, "-1", "1.0", "[" * 3000, '["a", "b"]', "[1]"])
ROW_VALUES = (
    st.text(max_size=10) | st.lists(st.text(max_size=5), max_size=3) | st.integers(-2, 5) | JSON | NUMBERISH
)
TEXTS = st.text(min_size=1, max_size=6).filter(str.strip)


@st.composite
def example_rows(draw) -> dict:
    """A valid row (maybe multiple choice) with 0-2 fields set to odd values or removed."""
    row = {"instruction": draw(TEXTS), "output": draw(TEXTS)}
    if draw(st.booleans()):
        row["choices"] = draw(st.lists(TEXTS, min_size=1, max_size=3))
        row["answer"] = draw(st.integers(0, len(row["choices"]) - 1))
    row.update(draw(st.fixed_dictionaries({}, optional={field: NUMBERISH | ROW_VALUES for field in FIELDS})))
    for field in draw(st.lists(ROW_KEYS | st.text(max_size=4), max_size=2, unique=True)):
        if draw(st.booleans()):
            row[field] = draw(ROW_VALUES)
        else:
            row.pop(field, None)
    return row


@st.composite
def jsonl_lines(draw) -> str:
    kind = draw(st.sampled_from(["row", "row", "row", "raw", "json"]))
    if kind == "json":
        return json.dumps(draw(JSON))
    row = draw(example_rows())
    if kind == "raw":
        row[draw(ROW_KEYS)], raw = PLACEHOLDER, draw(RAW)
        return with_raw(json.dumps(row), raw)
    return json.dumps(row)


JSONL_FILES = st.one_of(
    st.lists(jsonl_lines(), max_size=5).map(lambda lines: "\n".join(lines).encode()),
    st.lists(jsonl_lines(), min_size=1, max_size=3).flatmap(
        lambda lines: mutated_bytes("\n".join(lines).encode())
    ),
    RAW.map(str.encode),
    st.binary(max_size=64),
)

CELLS = (
    st.text(max_size=8) | NUMBERISH
    | st.sampled_from(['"', '""', ",", "\n", "\r", "\x00", "\ufeff", "a,b", '"a"b', "", " "])
)  # fmt: skip


@st.composite
def csv_files(draw) -> bytes:
    """A header of field names and random text, rows of random cells, quoted or not (so, often malformed)."""
    header = draw(st.lists(ROW_KEYS | st.text(max_size=6), min_size=1, max_size=5))
    if draw(st.booleans()):
        header = [*draw(st.permutations(["instruction", "output", "choices", "answer"])), *header[:1]]
    rows = draw(st.lists(st.lists(CELLS, min_size=len(header) - 1, max_size=len(header) + 1), max_size=4))

    def line(cells: list[str]) -> str:
        quote = draw(st.sampled_from(["never", "always", "maybe"]))
        out = []
        for cell in cells:
            if quote == "always" or (quote == "maybe" and draw(st.booleans())):
                cell = '"' + cell.replace('"', '""') + '"'
            out.append(cell)
        return ",".join(out)

    text = "\n".join(line(cells) for cells in [header, *rows])
    kind = draw(st.sampled_from(["text", "text", "mutated", "bytes"]))
    if kind == "text":
        return text.encode()
    if kind == "mutated":
        return draw(mutated_bytes(text.encode()))
    return draw(st.binary(max_size=64))


MAPPINGS = st.none() | st.dictionaries(
    st.sampled_from(["instruction", "input", "output", "choices", "answer"]), st.text(max_size=6) | ROW_KEYS,
    max_size=2,
)  # fmt: skip


def check_records(path: Path, mapping: dict | None) -> None:
    before = snapshot(path.parent)
    try:
        records = load_records(path, mapping)
    except DataError as exc:
        assert str(path) in str(exc), exc
    else:
        assert records and all(isinstance(r, Record) for r in records)
        for record in records:
            assert all(isinstance(getattr(record, f), str) for f in ("instruction", "input", "output"))
            record.prompt().encode("utf-8")  # text a tokenizer can take: no lone surrogates
            json.dumps(record.to_dict(), ensure_ascii=False).encode("utf-8")
    assert snapshot(path.parent) == before


def test_fuzz_jsonl_examples(tmp_path):
    @settings(max_examples=examples(100), **FUZZ)
    @given(content=JSONL_FILES, mapping=MAPPINGS)
    @example(content=DEEP, mapping=None)  # RecursionError from json.loads
    @example(content=b'{"instruction": "\\ud800", "output": "b"}', mapping=None)  # UnicodeEncodeError, later
    @example(content=b'{"instruction": "a", "output": "b", "answer": "\xc2\xb2"}', mapping=None)  # ValueError
    @example(content=b'{"instruction": "a", "output": "b", "choices": "' + b"1" * 5000 + b'"}', mapping=None)
    def run(content: bytes, mapping: dict | None) -> None:
        path = tmp_path / "examples.jsonl"
        path.write_bytes(content)
        check_records(path, mapping)

    run()


def test_fuzz_csv_examples(tmp_path):
    @settings(max_examples=examples(100), **FUZZ)
    @given(content=csv_files(), mapping=MAPPINGS)
    @example(content="instruction,output,answer\na,b,²\n".encode(), mapping=None)  # ValueError from int()
    @example(content=b"instruction,output,choices\na,b," + b"1" * 5000 + b"\n", mapping=None)  # the same
    @example(content=b"instruction,output,choices\na,b," + b"[" * 3000, mapping=None)  # RecursionError
    def run(content: bytes, mapping: dict | None) -> None:
        path = tmp_path / "examples.csv"
        path.write_bytes(content)
        check_records(path, mapping)

    run()


# ---- 5. probe files --------------------------------------------------------------------------------------
PROBE_FILES = st.one_of(
    st.lists(st.text(max_size=10) | JSON, max_size=4).map(lambda v: json.dumps(v).encode()),
    st.lists(st.fixed_dictionaries({"text": st.text(max_size=10) | JSON}) | JSON, max_size=4).map(
        lambda rows: "\n".join(json.dumps(r) for r in rows).encode()
    ),
    json_file_texts(["a probe", "another probe"]),
    json_file_texts({"text": "a probe"}),
)


def test_fuzz_probe_files(tmp_path):
    @settings(max_examples=examples(80), **FUZZ)
    @given(content=PROBE_FILES, suffix=st.sampled_from([".json", ".jsonl", ".txt"]))
    @example(content=b"\x80", suffix=".json")  # UnicodeDecodeError
    @example(content=b"\x80", suffix=".jsonl")  # the same
    @example(content=DEEP, suffix=".json")  # RecursionError from json.loads
    @example(content=DEEP, suffix=".jsonl")  # the same
    @example(content=b"[]", suffix=".json")  # a ProbeError that did not name the file
    @example(content=b'{"text": 1}', suffix=".jsonl")  # the same
    @example(content=b'["\\ud800"]', suffix=".json")  # UnicodeEncodeError, in the tokenizer
    def run(content: bytes, suffix: str) -> None:
        path = tmp_path / f"probes{suffix}"
        path.write_bytes(content)
        before = snapshot(tmp_path)
        try:
            probes = ProbeSet.from_file(path)
        except ProbeError as exc:
            assert str(path) in str(exc), exc
        else:
            assert probes.texts and all(isinstance(t, str) and t.strip() for t in probes.texts)
            assert all(t.encode("utf-8") for t in probes.texts)  # text a tokenizer can take
            assert probes.fingerprint
        assert snapshot(tmp_path) == before
        path.unlink()

    run()
