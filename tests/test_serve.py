"""Serving: mixed-adapter batches, the LRU, weighted mixes, the HTTP API, the vLLM request builder."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from delta_router.models.base import resolve_base
from delta_router.routing.router import BASE_ADAPTER, QueryEncoder, RouteDecision, Router, query_text
from delta_router.serving.app import create_app
from delta_router.serving.backends import GenerationRequest, PeftBackend, VllmBackend
from delta_router.serving.scheduler import BatchScheduler
from delta_router.testing import SYNTHETIC_WORDS, synthetic_domain

PROMPT = "Below is an instruction.\n\n### Instruction:\nName a fruit item. apple pear\n\n### Response:"


@pytest.fixture(scope="module")
def served_adapters(adapter_factory, tmp_path_factory) -> dict:
    """One strong random adapter per synthetic domain (ids ``fruit``, ``digits``)."""
    root = tmp_path_factory.mktemp("served")
    return {
        name: adapter_factory.make(root / name, seed=10 + i, scale=2.0)
        for i, name in enumerate(SYNTHETIC_WORDS)
    }


@pytest.fixture(scope="module")
def backend(tiny_base, served_adapters) -> PeftBackend:
    return PeftBackend(resolve_base(tiny_base), served_adapters, max_loaded=1)


@pytest.fixture(scope="module")
def router(tiny_base, backend) -> Router:
    examples = {n: [query_text(r) for r in synthetic_domain(n).train[0]] for n in SYNTHETIC_WORDS}
    return Router.fit(backend.encoder(), resolve_base(tiny_base).fingerprint, examples, threshold=None)


@pytest.fixture(scope="module")
def client(backend, router):
    with TestClient(create_app(BatchScheduler(backend, router), max_tokens_limit=64)) as c:
        yield c


def test_mixed_batch_equals_one_request_at_a_time(backend):
    requests = [GenerationRequest(PROMPT, a, max_tokens=8) for a in ("fruit", "digits", BASE_ADAPTER)]
    requests.append(
        GenerationRequest("A much longer prompt, padded on the left of the others: " * 2, "fruit", 5)
    )
    together = backend.generate(requests)
    alone = [backend.generate([r])[0] for r in requests]
    assert [r.text for r in together] == [r.text for r in alone]
    assert len({r.text for r in together[:3]}) == 3  # the adapters really change the output
    assert together[3].completion_tokens <= 5
    assert len(backend.loaded) <= 2  # LRU: max_loaded=1, or the batch's own adapters


def test_a_failed_decode_step_fails_its_requests_and_the_server_goes_on(backend, monkeypatch):
    from delta_router.serving.decoding import DecodeBatch

    step, failures = DecodeBatch.step, iter([True])

    def flaky(self):
        if next(failures, False):
            raise RuntimeError("simulated device error")
        return step(self)

    monkeypatch.setattr(DecodeBatch, "step", flaky)
    with TestClient(create_app(BatchScheduler(backend), max_tokens_limit=8)) as client:
        body = {"model": "fruit", "prompt": "apple", "max_tokens": 3}
        failed = client.post("/v1/completions", json=body)
        assert failed.status_code == 500 and "simulated" in failed.json()["error"]["message"]
        assert client.post("/v1/completions", json=body).status_code == 200


def test_a_request_joins_a_running_batch_and_decodes_as_if_alone(backend):
    """Continuous batching: rows join between steps and leave when done; greedy text is unchanged."""
    first = GenerationRequest(PROMPT, "fruit", max_tokens=8, min_tokens=8)
    short = GenerationRequest(
        "A longer prompt than the first one, on the left: " * 2, "digits", 3, min_tokens=3
    )
    last = GenerationRequest("Name a digit.", BASE_ADAPTER, max_tokens=6, min_tokens=6)
    alone = {id(r): backend.generate([r])[0].text for r in (first, short, last)}
    batch, results, order, sizes = backend.decode_batch(), {}, [], []
    for request in (first, short, last):  # each joins the running batch at the next step
        assert backend.admit(batch, request) is None
        sizes.append(len(batch))
        for done, result in batch.step():
            results[id(done)], order = result, [*order, done]
    while len(batch):
        sizes.append(len(batch))
        for done, result in batch.step():
            results[id(done)], order = result, [*order, done]
    assert {k: r.text for k, r in results.items()} == alone
    assert sizes[:3] == [1, 2, 3] and sizes == sorted(sizes[:3]) + sorted(sizes[3:], reverse=True)
    assert order == [short, first, last]  # each left as soon as it was done
    assert [results[id(r)].completion_tokens for r in (first, short, last)] == [8, 3, 6]


def test_row_lora_mix_equals_peft_cat_combination(tiny_base, served_adapters):
    from peft import PeftModel

    from delta_router.serving.decoding import RowLora

    base = resolve_base(tiny_base)
    model, ids = base.load_model(), base.load_tokenizer()(PROMPT, return_tensors="pt")["input_ids"]
    lora = RowLora(model, base, max_loaded=2)
    mix = [(lora.read(served_adapters["fruit"]), 0.7), (lora.read(served_adapters["digits"]), 0.3)]
    with torch.inference_mode(), lora.applied([mix, []]):
        ours = model(input_ids=ids.repeat(2, 1)).logits
    peft = PeftModel.from_pretrained(base.load_model(), str(served_adapters["fruit"]), adapter_name="fruit")
    peft.load_adapter(str(served_adapters["digits"]), adapter_name="digits")
    peft.add_weighted_adapter(["fruit", "digits"], [0.7, 0.3], "mix", combination_type="cat")
    peft.set_adapter("mix")
    with torch.inference_mode():
        theirs = peft(input_ids=ids).logits
        with peft.disable_adapter():
            plain = peft(input_ids=ids).logits
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], plain[0], atol=1e-5, rtol=1e-5)  # the base row is untouched


def test_weighted_mix_and_stop_strings(backend):
    decision = RouteDecision(["fruit", "digits"], [0.7, 0.3], 0.9)
    name = backend.target(decision)
    assert name.startswith("mix_") and backend.target(decision) == name
    [result] = backend.generate([GenerationRequest(PROMPT, name, max_tokens=6)])
    assert result.completion_tokens >= 1
    full = backend.generate([GenerationRequest(PROMPT, "fruit", max_tokens=8)])[0].text
    stop = full[2:4]
    cut = backend.generate([GenerationRequest(PROMPT, "fruit", max_tokens=8, stop=[stop])])[0]
    assert stop not in cut.text and full.startswith(cut.text) and cut.finish_reason == "stop"


def test_models_and_health(client):
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids[:2] == ["auto", "base"] and set(SYNTHETIC_WORDS) <= set(ids)
    assert client.get("/health").json()["status"] == "ok"


def test_completion_routes_auto_and_pins_named_adapters(client):
    digits = query_text(synthetic_domain("digits", seed=7).test[0])
    routed = client.post("/v1/completions", json={"model": "auto", "prompt": digits, "max_tokens": 4})
    assert routed.status_code == 200, routed.text
    body = routed.json()
    assert body["model"] == "digits" and routed.headers["x-delta-router-adapter"] == "digits"
    assert body["x_delta_router"]["routing"]["adapters"] == ["digits"]
    assert body["usage"]["completion_tokens"] <= 4
    pinned = client.post("/v1/completions", json={"model": "fruit", "prompt": digits, "max_tokens": 4}).json()
    assert pinned["model"] == "fruit" and "routing" not in pinned["x_delta_router"]


def test_chat_stream_matches_the_plain_answer(client):
    request = {
        "model": "fruit",
        "messages": [{"role": "user", "content": "Name a fruit item."}],
        "max_tokens": 6,
    }
    plain = client.post("/v1/chat/completions", json=request).json()
    with client.stream("POST", "/v1/chat/completions", json=request | {"stream": True}) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[0]["x_delta_router"]["adapter"] == "fruit"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_are_batched(client):
    import concurrent.futures

    before = client.get("/health").json()
    payload = {"model": "auto", "max_tokens": 3}
    prompts = [query_text(r) for n in SYNTHETIC_WORDS for r in synthetic_domain(n, seed=9).test[:4]]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(lambda p: client.post("/v1/completions", json=payload | {"prompt": p}), prompts)
        )
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies if r.status_code != 200]
    after = client.get("/health").json()
    assert after["requests"] - before["requests"] == len(prompts)
    assert after["rows"] - before["rows"] > after["batches"] - before["batches"]  # requests shared forwards


def test_chat_stream_names_the_routed_adapter_in_its_header(client):
    digits = query_text(synthetic_domain("digits", seed=7).test[0])
    messages = [{"role": "user", "content": digits}]
    request = {"model": "auto", "messages": messages, "max_tokens": 4, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert response.status_code == 200 and chunks
    assert response.headers["x-delta-router-adapter"] == "digits"
    assert {c["model"] for c in chunks} == {"digits"}


def test_text_parts_n_1_and_extreme_seeds_are_accepted(client):
    def answer(content, **extra) -> list:
        body = {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "n": 1} | extra
        reply = client.post("/v1/chat/completions", json=body)
        assert reply.status_code == 200, reply.text
        return reply.json()["choices"]

    parts = [{"type": "text", "text": "Name a fruit"}, {"type": "text", "text": "item."}]
    assert answer(parts) == answer("Name a fruit\nitem.")
    for seed in (-(2**63), 2**64 - 1):
        assert len(answer("Name a fruit item.", temperature=0.7, seed=seed)) == 1


STREAMED = {"messages": [{"role": "user", "content": "hi"}], "stream": True}
JSON_HEADERS = {"content-type": "application/json"}
BLANK_LAST_TURN = [{"role": "user", "content": "hi"}, {"role": "user", "content": " "}]
IMAGE = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]}]


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("completions", "{not json", 400, "not valid JSON"),
        ("completions", b'{"prompt": "caf\xe9"}', 400, "not valid JSON"),  # Latin-1, not UTF-8
        ("completions", "", 400, "must be a JSON object"),
        ("completions", "[1, 2]", 400, "must be a JSON object"),
        ("completions", '"hi"', 400, "must be a JSON object"),
        ("completions", {"model": "nope", "prompt": "hi"}, 404, "does not exist"),
        ("completions", {"prompt": "hi", "max_tokens": 65}, 400, "limit"),
        ("completions", {"prompt": "word " * 600, "max_tokens": 8}, 400, "context length"),
        ("completions", {"prompt": "   "}, 400, "prompt is empty"),
        ("completions", {"max_tokens": 4}, 400, "prompt"),
        ("completions", {"prompt": ["a", "b"]}, 400, "one prompt"),
        ("completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("completions", {"prompt": "hi", "n": 5}, 400, "only n=1 is supported"),
        ("completions", {"prompt": "hi", "temperature": 0.5, "seed": 2**70}, 400, "seed"),
        ("completions", {"prompt": "hi", "temperature": 0.5, "seed": -(2**63) - 1}, 400, "seed"),
        ("chat/completions", STREAMED | {"temperature": 0.5, "seed": 2**70}, 400, "seed"),
        ("chat/completions", STREAMED | {"n": 2}, 400, "only n=1 is supported"),
        ("chat/completions", {"messages": IMAGE}, 400, "only text content parts"),
        ("chat/completions", {"messages": BLANK_LAST_TURN}, 400, "last user message"),
        ("completions", '{"prompt": "hi \\ud800"}', 400, "lone surrogate"),
        ("completions", {"prompt": "hi", "max_tokens": True}, 400, "valid integer"),
        ("completions", {"prompt": "hi", "max_tokens": "5"}, 400, "valid integer"),
        ("completions", '{"prompt": "hi", "temperature": NaN}', 400, "finite number"),
        ("chat/completions", '{"messages": [{"role": "user", "content": "\\udc00"}]}', 400, "lone surrogate"),
    ],
)
def test_bad_requests_get_openai_errors(client, path, body, status, needle):
    data = {"content": body} if isinstance(body, str | bytes) else {"json": body}
    response = client.post(f"/v1/{path}", headers={"content-type": "application/json"}, **data)
    assert response.status_code == status
    error = response.json()["error"]
    assert needle in error["message"] and error["type"] == "invalid_request_error"
    assert client.get("/health").status_code == 200  # still serving


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "user", "content": ""}], [{"role": "system", "content": "x"}], [{"role": "bot"}]],
)
def test_bad_chat_requests_get_openai_errors(client, messages):
    response = client.post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 400 and "messages" in response.json()["error"]["message"]


def test_vllm_requests_are_built_without_vllm_installed(monkeypatch, tiny_base, served_adapters):
    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: ("params", kw)
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda name, ident, path: (name, ident, path)
    for name, module in {
        "vllm": fake,
        "vllm.lora": types.ModuleType("vllm.lora"),
        "vllm.lora.request": lora,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    backend = VllmBackend(resolve_base(tiny_base), served_adapters)
    name, ident, path = backend.lora_request("fruit")
    assert name == "fruit" and ident > 0 and path == str(served_adapters["fruit"])
    assert backend.lora_request("fruit") == (name, ident, path) and backend.lora_request(BASE_ADAPTER) is None
    _, params = backend.sampling_params(GenerationRequest("p", "fruit", max_tokens=7, stop=["\n"]))
    assert params["max_tokens"] == 7 and params["stop"] == ["\n"] and params["temperature"] == 0.0
    assert backend.target(RouteDecision(["fruit", "digits"], [0.3, 0.7], 0.5)) == "digits"


def test_vllm_batch_adds_requests_to_the_engine_and_streams_each_step(
    monkeypatch, tiny_base, served_adapters
):
    """Against a fake engine that decodes two characters per step: text streams as it grows."""
    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)

    class Engine:
        def __init__(self):
            self.running: dict[str, list] = {}

        def add_request(self, request_id, prompt, params, lora_request=None):
            self.running[request_id] = [prompt.upper()[: params["max_tokens"]], 0]

        def step(self):
            outputs = []
            for request_id, state in list(self.running.items()):
                state[1] += 2
                target, n = state
                finished = n >= len(target)
                completion = types.SimpleNamespace(text=target[:n], token_ids=[0] * min(n, len(target)),
                                                   finish_reason="length" if finished else None)  # fmt: skip
                outputs.append(types.SimpleNamespace(request_id=request_id, prompt_token_ids=[1, 2],
                                                     outputs=[completion], finished=finished))  # fmt: skip
                if finished:
                    del self.running[request_id]
            return outputs

    backend = VllmBackend(resolve_base(tiny_base), {})
    backend.__dict__["_engine"] = types.SimpleNamespace(llm_engine=Engine())
    streamed: list[str] = []
    requests = [GenerationRequest("abcde", max_tokens=5, on_text=streamed.append), GenerationRequest("xy")]
    results = backend.generate(requests)
    assert [r.text for r in results] == ["ABCDE", "XY"] and streamed == ["AB", "CD", "E"]
    assert results[0].completion_tokens == 5 and results[0].finish_reason == "length"

    engine = backend.engine.llm_engine  # a failed step: the scheduler aborts what was running
    engine.abort_request = lambda ids: [engine.running.pop(i) for i in ids]
    batch = backend.decode_batch()
    backend.admit(batch, GenerationRequest("abcdef"))
    assert len(engine.running) == 1
    batch.abort()
    assert len(batch) == 0 and not engine.running


def test_cli_route_fit_query_then_serve_the_index(tiny_base, adapters, tmp_path, capsys):
    from delta_router.cli import main
    from delta_router.data import write_records
    from delta_router.search.index import ModelIndex
    from delta_router.serving import build_app

    def run_json(*argv: str):
        assert main([*argv, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    idx, router_dir = str(tmp_path / "idx"), str(tmp_path / "router")
    run_json("index", "add", str(adapters[0]), str(adapters[1]), "--index", idx, "--base", str(tiny_base),
             "--id", "fruit", "--id", "digits")  # fmt: skip
    examples = []
    for name in SYNTHETIC_WORDS:
        write_records(tmp_path / f"{name}.jsonl", synthetic_domain(name).train[0])
        examples += ["--examples", f"{name}={tmp_path / f'{name}.jsonl'}"]
    fitted = run_json("route", "fit", "--index", idx, "--out", router_dir, *examples)
    assert sorted(fitted["models"]) == sorted(SYNTHETIC_WORDS)
    digits = query_text(synthetic_domain("digits", seed=7).test[0])
    [decision] = run_json("route", "query", digits, "--router", router_dir)
    assert decision["target"] == "digits"

    with TestClient(build_app(ModelIndex.load(idx), Router.load(router_dir), max_loaded=2)) as client:
        reply = client.post("/v1/completions", json={"prompt": digits, "max_tokens": 2})
        assert reply.status_code == 200 and reply.json()["model"] == "digits"

    assert main(["route", "fit", "--index", idx, "--out", router_dir]) == 2
    assert "--examples" in capsys.readouterr().err
    assert (
        main(
            [
                "route",
                "fit",
                "--index",
                idx,
                "--out",
                router_dir,
                "--examples",
                f"law={tmp_path / 'fruit.jsonl'}",
            ]
        )
        == 2
    )
    assert "not in the index" in capsys.readouterr().err


def test_adapters_register_and_leave_while_serving(tiny_base, other_base, adapters, tmp_path):
    """POST /v1/adapters checks, embeds, profiles and serves a finetune in one step; DELETE undoes
    it; a bad registration is a 4xx and changes nothing (index on disk, router, served models)."""
    import shutil

    from delta_router.search.index import ModelIndex
    from delta_router.serving import build_app
    from delta_router.testing import RandomAdapterFactory
    from delta_router.training.trainer import LoraTrainer, TrainConfig

    idx = tmp_path / "idx"
    router, examples = _indexed_router(tiny_base, adapters, idx)
    foreign = RandomAdapterFactory(other_base).make(tmp_path / "foreign", seed=0)
    corrupt = shutil.copytree(adapters[3], tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"junk")
    dora_config = TrainConfig(max_steps=1, batch_size=2, micro_batch_size=2, use_dora=True)
    dora = LoraTrainer(tiny_base, dora_config, progress=False).fit(
        synthetic_domain("fruit").train[0], tmp_path / "dora"
    )
    app = build_app(ModelIndex.load(idx), router, max_loaded=2, index_dir=idx)
    with TestClient(app) as client:

        def served() -> set[str]:
            return {m["id"] for m in client.get("/v1/models").json()["data"]}

        before = served()
        for body, status in (({"path": str(foreign), "id": "foreign"}, 400),
                             ({"path": str(corrupt), "id": "corrupt"}, 400),
                             ({"path": str(dora.adapter_dir), "id": "dora"}, 400),  # not servable per row
                             ({"path": str(adapters[2]), "id": "fruit"}, 409),
                             ({"path": str(adapters[2]), "id": "bad.id"}, 400),
                             ({"path": "/" + "a" * 5000, "id": "long"}, 400),  # ENAMETOOLONG
                             ({"path": str(adapters[2]) + "\ud800", "id": "odd"}, 400),
                             ({"path": str(adapters[2]), "examples": ["\ud800"]}, 400),
                             ({"path": str(adapters[2]), "id": "x2", "examples": []}, 400),
                             ({"path": str(adapters[2]), "id": "x2", "examples": [" "]}, 400)):  # fmt: skip
            ascii_json = json.dumps(body)  # a lone surrogate travels as its \\u escape
            reply = client.post("/v1/adapters", content=ascii_json, headers=JSON_HEADERS)
            assert reply.status_code == status and reply.json()["error"]["message"]
        assert served() == before and len(ModelIndex.load(idx)) == 2
        assert router.model_ids == ["fruit", "digits"]

        new = {"path": str(adapters[2]), "id": "new", "tags": {"domain": "x"}}
        reply = client.post("/v1/adapters", json=new)
        assert reply.status_code == 201 and reply.json()["profile"] == "data-free"
        with_examples = {"path": str(adapters[3]), "id": "shown", "examples": examples["fruit"][:4]}
        assert client.post("/v1/adapters", json=with_examples).json()["profile"] == "examples"
        listed = {m["id"]: m.get("x_delta_router") for m in client.get("/v1/models").json()["data"]}
        assert listed["new"]["domain"] == "x" and listed["new"]["base"] == str(tiny_base)
        assert "new" in ModelIndex.load(idx) and "new" in router.model_ids
        reply = client.post("/v1/completions", json={"model": "new", "prompt": "apple", "max_tokens": 2})
        assert reply.status_code == 200 and reply.json()["model"] == "new"
        auto = client.post("/v1/completions", json={"model": "auto", "prompt": "apple", "max_tokens": 2})
        assert auto.status_code == 200

        assert client.delete("/v1/adapters/new").status_code == 200
        assert client.delete("/v1/adapters/new").status_code == 404
        assert "new" not in served() and "new" not in ModelIndex.load(idx) and "new" not in router.model_ids
        gone = client.post("/v1/completions", json={"model": "new", "prompt": "apple", "max_tokens": 2})
        assert gone.status_code == 404


def test_a_profile_from_examples_is_encoded_under_the_scheduler_lock(tiny_base, adapters, tmp_path):
    """The query encoder runs the serving model, whose decode steps put row-LoRA hooks on it: a
    registration with examples encodes them only while it holds the lock the decode loop holds."""
    import threading

    from delta_router.search.index import ModelIndex
    from delta_router.serving.registry import AdapterRegistry

    idx = tmp_path / "idx"
    router, examples = _indexed_router(tiny_base, adapters, idx)
    scheduler = BatchScheduler(PeftBackend(resolve_base(tiny_base), {}), router)
    encode, held = scheduler.encoder, []

    def try_lock() -> None:
        free = scheduler.lock.acquire(blocking=False)
        held.append(not free)
        if free:
            scheduler.lock.release()

    def encoder(texts):
        other = threading.Thread(target=try_lock)
        other.start()
        other.join()
        return encode(texts)

    scheduler.encoder = encoder
    registry = AdapterRegistry(ModelIndex.load(idx), scheduler)
    assert registry.register(adapters[3], "shown", examples=examples["fruit"][:4])["profile"] == "examples"
    assert held == [True]


def test_a_data_free_registration_learns_only_from_profiles_made_from_examples(
    tiny_base, adapters, tmp_path, monkeypatch
):
    """The map of a data-free registration is fitted on the models profiled from examples, not on
    earlier guesses; in a router of guesses only (fitted data-free), on all of them."""
    from delta_router.routing.data_free import ProfileMap
    from delta_router.search.index import ModelIndex
    from delta_router.serving.registry import AdapterRegistry

    idx = tmp_path / "idx"
    router, _ = _indexed_router(tiny_base, adapters, idx)
    scheduler = BatchScheduler(PeftBackend(resolve_base(tiny_base), {}), router)
    registry = AdapterRegistry(ModelIndex.load(idx), scheduler)
    assert registry.register(adapters[2], "guessed")["profile"] == "data-free"
    fit, pairs = ProfileMap.fit, []
    monkeypatch.setattr(ProfileMap, "fit", lambda self, d, *rest: pairs.append(len(d)) or fit(self, d, *rest))
    registry.register(adapters[3], "guessed-too")
    assert pairs == [2]  # fruit and digits, not "guessed"
    assert router.sources == ["examples", "examples", "data-free", "data-free"]

    registry.remove("guessed-too")
    router.sources = ["data-free"] * len(router.model_ids)  # as if fitted with --data-free
    assert registry.register(adapters[3], "guessed-too")["profile"] == "data-free"
    assert pairs == [2, 3]


def test_a_data_free_registration_is_centred_like_a_data_free_fit(tiny_base, adapters, tmp_path):
    """A registered profile is the map's prediction less the mean prediction over the models it
    learns from and itself, as ``fit_data_free`` centres its profiles: not the raw prediction, whose
    shared direction raises its cosine to every query alike."""
    from delta_router.embedding.vectors import unit_rows
    from delta_router.routing.data_free import (
        DEFAULT_PROFILE_DELTAS,
        ProfileMap,
        centred_profiles,
        delta_blocks,
        profile_deltas_of,
    )
    from delta_router.search.index import ModelIndex
    from delta_router.serving.registry import AdapterRegistry

    idx = tmp_path / "idx"
    router, _ = _indexed_router(tiny_base, adapters, idx)
    # two centred profiles are opposite, and centring would not move a blend of them: draw others
    router.profiles = known = unit_rows(np.random.default_rng(0).normal(size=router.profiles.shape))
    router.covers = router.profiles.copy()  # own covers: an older data-free router's
    scheduler = BatchScheduler(PeftBackend(resolve_base(tiny_base), {}), router)
    registry = AdapterRegistry(ModelIndex.load(idx), scheduler)
    registry.register(adapters[2], "guessed")
    embeddings = [registry.index.get(m).embedding for m in ("fruit", "digits", "guessed")]
    deltas = profile_deltas_of(embeddings, DEFAULT_PROFILE_DELTAS, registry.profile_deltas_embedder)
    predicted = (
        ProfileMap(blocks=delta_blocks(DEFAULT_PROFILE_DELTAS))
        .fit(deltas[:-1], known, deltas)
        .predict(deltas)
    )
    assert np.allclose(router.profiles[-1], centred_profiles(predicted)[-1], atol=1e-5)
    # three whitened deltas are near a simplex, whose predictions nearly cancel: centring moves little
    assert not np.allclose(router.profiles[-1], predicted[-1], atol=1e-5)
    assert np.allclose(router.covers[-1], predicted[-1], atol=1e-5)  # as such routers' models: its prediction


def test_first_registrations_at_once_build_one_embedder(tiny_base, adapters, tmp_path, monkeypatch):
    """Building an embedder loads the base: two threads asking for it first get the same one."""
    import threading
    import time

    from delta_router.search.index import ModelIndex
    from delta_router.serving import registry as registry_module

    idx = tmp_path / "idx"
    router, _ = _indexed_router(tiny_base, adapters, idx)
    registry = registry_module.AdapterRegistry(
        ModelIndex.load(idx), BatchScheduler(PeftBackend(resolve_base(tiny_base), {}), router)
    )
    built = []

    def slow_for_space(space, **options):
        time.sleep(0.2)  # both threads would see none built yet
        built.append(space)
        return object()

    monkeypatch.setattr(registry_module.DeltaEmbedder, "for_space", slow_for_space)
    got = []
    threads = [threading.Thread(target=lambda: got.append(registry.embedder)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 1 and got[0] is got[1]


def test_the_registrys_two_embedders_share_one_copy_of_the_base(tiny_base, adapters, tmp_path):
    from delta_router.search.index import ModelIndex
    from delta_router.serving.registry import AdapterRegistry

    idx = tmp_path / "idx"
    router, _ = _indexed_router(tiny_base, adapters, idx)
    registry = AdapterRegistry(
        ModelIndex.load(idx), BatchScheduler(PeftBackend(resolve_base(tiny_base), {}), router)
    )
    for kind in ("formats", "plain"):
        assert registry.profile_deltas_embedder(kind).live is registry.embedder.live
        assert registry.profile_deltas_embedder(kind).probes != registry.embedder.probes


def test_an_indexed_dora_adapter_is_not_served_and_not_routed_to(tiny_base, adapters, tmp_path, caplog):
    """An index entry that cannot be served per row is skipped at start-up with a warning, not a
    500 at its first request."""
    from delta_router.cli import main
    from delta_router.search.index import ModelIndex
    from delta_router.serving import build_app
    from delta_router.training.trainer import LoraTrainer, TrainConfig

    idx = tmp_path / "idx"
    router, _ = _indexed_router(tiny_base, adapters, idx)
    dora_config = TrainConfig(max_steps=1, batch_size=2, micro_batch_size=2, use_dora=True)
    dora = LoraTrainer(tiny_base, dora_config, progress=False).fit(
        synthetic_domain("fruit").train[0], tmp_path / "dora"
    )
    assert main(["index", "add", str(dora.adapter_dir), "--index", str(idx), "--id", "dora",
                 "--base", str(tiny_base)]) == 0  # fmt: skip
    router.add("dora", router.profiles[0])  # a router fitted while it was indexed
    app = build_app(ModelIndex.load(idx), router, max_loaded=2)
    assert "dora" in caplog.text and "use_dora" in caplog.text
    assert "dora" not in router.model_ids
    with TestClient(app) as client:
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} >= {"fruit", "digits"}
        assert "dora" not in {m["id"] for m in client.get("/v1/models").json()["data"]}
        reply = client.post("/v1/completions", json={"model": "dora", "prompt": "apple", "max_tokens": 2})
        assert reply.status_code == 404
        auto = client.post("/v1/completions", json={"model": "auto", "prompt": "apple", "max_tokens": 2})
        assert auto.status_code == 200 and auto.json()["model"] != "dora"


def _indexed_router(tiny_base, adapters, idx) -> tuple[Router, dict]:
    """An index at ``idx`` of ``adapters[0:2]`` (ids fruit, digits) and a router fitted on them."""
    from delta_router.cli import main

    assert main(["index", "add", str(adapters[0]), str(adapters[1]), "--index", str(idx),
                 "--base", str(tiny_base), "--id", "fruit", "--id", "digits"]) == 0  # fmt: skip
    examples = {n: [query_text(r) for r in synthetic_domain(n).train[0]] for n in SYNTHETIC_WORDS}
    base = resolve_base(tiny_base)
    encoder = QueryEncoder.for_model(base.load_model(), base.load_tokenizer())
    return Router.fit(encoder, base.fingerprint, examples, threshold=None), examples


def test_registrations_and_removals_during_traffic_fail_no_request(tiny_base, adapters, tmp_path):
    """Clients keep sending (routed, pinned, and pinned to the adapter that comes and goes) while
    another thread registers and removes adapters: no 5xx, and the end state is the start state."""
    import concurrent.futures

    from delta_router.search.index import ModelIndex
    from delta_router.serving import build_app

    idx = tmp_path / "idx"
    router, _ = _indexed_router(tiny_base, adapters, idx)
    app = build_app(ModelIndex.load(idx), router, max_loaded=2, index_dir=idx)
    with TestClient(app) as client:
        before = {m["id"] for m in client.get("/v1/models").json()["data"]}

        def traffic(i: int) -> int:
            model = ("auto", "fruit", "churn-0", "churn-1")[i % 4]
            body = {"model": model, "prompt": f"apple {i}", "max_tokens": 3}
            return client.post("/v1/completions", json=body).status_code

        def churn() -> list[int]:
            codes = []
            for cycle in range(6):
                model_id = f"churn-{cycle % 2}"
                body = {"path": str(adapters[2 + cycle % 2]), "id": model_id}
                codes.append(client.post("/v1/adapters", json=body).status_code)
                codes.append(client.delete(f"/v1/adapters/{model_id}").status_code)
            return codes

        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            churned = pool.submit(churn)
            codes = list(pool.map(traffic, range(48)))
            assert churned.result() == [201, 200] * 6
        assert all(code == 200 for i, code in enumerate(codes) if i % 4 < 2)  # routed and stable pins
        assert set(codes) <= {200, 404}  # a pin to an adapter that is gone is a 404, never a 5xx
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == before
    assert sorted(ModelIndex.load(idx).model_ids()) == ["digits", "fruit"] and router.model_ids == [
        "fruit",
        "digits",
    ]


def test_a_backend_that_cannot_decode_fails_each_request_instead_of_hanging():
    import asyncio

    from delta_router.serving.scheduler import Job, run_job

    class Broken:
        name = "broken"

        def decode_batch(self):
            raise ModuleNotFoundError("No module named 'engine'")

    scheduler = BatchScheduler(Broken())
    scheduler.start()

    async def two_requests():
        loop = asyncio.get_running_loop()
        for _ in range(2):
            job = Job(GenerationRequest("hi", BASE_ADAPTER, max_tokens=2), "hi", loop)
            with pytest.raises(ModuleNotFoundError, match="engine"):
                await asyncio.wait_for(run_job(scheduler, job), timeout=10)

    try:
        asyncio.run(two_requests())
    finally:
        scheduler.stop()


def test_a_registration_names_the_field_it_is_refused_for(tiny_base, adapters, tmp_path):
    from delta_router.search.index import ModelIndex
    from delta_router.serving import build_app

    idx = tmp_path / "idx"
    _indexed_router(tiny_base, adapters, idx)
    with TestClient(build_app(ModelIndex.load(idx), None, index_dir=idx)) as client:  # no router
        reply = client.post("/v1/adapters", json={"path": str(adapters[2]), "id": "a.b"})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "id"
        reply = client.post("/v1/adapters", json={"path": str(adapters[2]), "examples": ["a query"]})
        assert reply.status_code == 400 and "no router" in reply.json()["error"]["message"]
    assert len(ModelIndex.load(idx)) == 2
