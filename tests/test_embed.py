"""DeltaEmbedder behaviour on a tiny random Llama and random LoRA adapters."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from delta_router import DeltaEmbedder
from delta_router.models.finetunes import Finetune
from delta_router.testing import RandomAdapterFactory, merge_adapter


def test_delta_of_the_base_itself_is_exactly_zero(tiny_base, tmp_path, adapter_factory):
    copy = shutil.copytree(tiny_base, tmp_path / "base-copy")  # a "full finetune" = the base
    zero = tmp_path / "zero-adapter"
    adapter_factory.make(zero, seed=0, scale=0.0)  # B = 0: a no-op LoRA
    full, lora = DeltaEmbedder(tiny_base, progress=False).embed([copy, zero])
    assert full.kind == "full" and lora.kind == "lora"
    assert np.all(full.vector == 0)
    assert np.all(lora.vector == 0)


def test_embeddings_are_deterministic_and_distinct(tiny_base, adapters):
    first = DeltaEmbedder(tiny_base, cache=False, progress=False).transform(adapters)
    second = DeltaEmbedder(tiny_base, cache=False, progress=False).transform(adapters)
    assert first.shape == (len(adapters), 64) and first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert np.all(np.linalg.norm(first, axis=1) > 0)
    assert not np.allclose(first[0], first[1])


def test_batched_adapters_equal_peft_reference_one_probe_at_a_time(tiny_base, adapters):
    fast = DeltaEmbedder(tiny_base, cache=False, progress=False).transform(adapters)
    ref = DeltaEmbedder(tiny_base, method="reference", cache=False, progress=False)
    slow = ref.transform(adapters)
    np.testing.assert_allclose(fast, slow, atol=1e-5, rtol=0)
    # the reference path unloads every adapter: the base answers as before
    assert np.all(ref.transform([tiny_base]) == 0)


def test_padding_side_does_not_change_results(tiny_base, adapters):
    vectors = {}
    for side in ("left", "right"):
        embedder = DeltaEmbedder(tiny_base, cache=False, progress=False)
        embedder.tokenizer.padding_side = side
        mask = embedder.probe_batch["attention_mask"]
        assert not bool(mask.all()), "probes must differ in length for this test to mean anything"
        vectors[side] = embedder.transform(adapters)
    np.testing.assert_allclose(vectors["left"], vectors["right"], atol=1e-5, rtol=0)


def test_full_finetune_equals_its_merged_lora(tiny_base, adapters, tmp_path):
    merged = merge_adapter(tiny_base, adapters[0], tmp_path / "merged")
    lora, full = DeltaEmbedder(tiny_base, cache=False, progress=False).embed([adapters[0], merged])
    assert full.kind == "full"
    np.testing.assert_allclose(full.vector, lora.vector, atol=1e-5, rtol=0)


def test_full_finetune_then_lora_restores_the_base(tiny_base, adapters, tmp_path):
    merged = merge_adapter(tiny_base, adapters[1], tmp_path / "merged")
    embedder = DeltaEmbedder(tiny_base, cache=False, progress=False)
    before = embedder.embed_one(adapters[2]).vector
    embedder.embed_one(merged)  # streams the full model into the live weights
    after = embedder.embed_one(adapters[2]).vector
    np.testing.assert_array_equal(before, after)


def test_unchanged_adapter_is_served_from_the_cache(tiny_base, adapters, monkeypatch):
    first = DeltaEmbedder(tiny_base, progress=False).embed_one(adapters[0], model_id="a")

    def no_compute(*args, **kwargs):
        raise AssertionError("cached embedding was recomputed")

    monkeypatch.setattr(DeltaEmbedder, "activations", no_compute)
    again = DeltaEmbedder(tiny_base, progress=False).embed_one(adapters[0], model_id="b")
    np.testing.assert_array_equal(first.vector, again.vector)
    assert again.model_id == "b" and again.content_hash == first.content_hash


def test_changed_adapter_gets_a_new_embedding(tiny_base, adapters, adapter_factory, tmp_path):
    path = shutil.copytree(adapters[0], tmp_path / "a")
    embedder = DeltaEmbedder(tiny_base, progress=False)
    before = embedder.embed_one(path)
    adapter_factory.make(path, seed=99, scale=0.1)
    after = DeltaEmbedder(tiny_base, progress=False).embed_one(path)
    assert after.content_hash != before.content_hash
    assert not np.allclose(after.vector, before.vector)


@pytest.mark.parametrize(
    "options",
    [{"layer": 1}, {"layer": 0}, {"pooling": "mean"}, {"normalize": "probe"}, {"probes": ["Hi."]}],
)
def test_options_change_the_space_and_the_vector(tiny_base, adapters, options):
    default = DeltaEmbedder(tiny_base, cache=False, progress=False)
    other = DeltaEmbedder(tiny_base, cache=False, progress=False, **options)
    assert other.space != default.space and other.space.key != default.space.key
    a, b = default.embed_one(adapters[0]).vector, other.embed_one(adapters[0]).vector
    assert b.shape == a.shape
    if options != {"layer": 0}:  # layer 0 is the token embedding: no LoRA has acted yet
        assert not np.allclose(a, b)
    else:
        assert np.all(b == 0)


def test_probe_normalisation_gives_unit_rows_before_the_mean(tiny_base, adapters):
    embedder = DeltaEmbedder(tiny_base, normalize="probe", cache=False, progress=False)
    vector = embedder.embed_one(adapters[0]).vector
    assert np.linalg.norm(vector) <= 1.0 + 1e-6


def test_dora_adapter_falls_back_to_the_peft_path(tiny_base, tmp_path):
    dora = RandomAdapterFactory(tiny_base, targets=("q_proj", "v_proj"), use_dora=True)
    path = dora.make(tmp_path / "dora", seed=3, scale=0.1)
    embedder = DeltaEmbedder(tiny_base, cache=False, progress=False)
    from delta_router.models.finetunes import load_lora_factors

    assert not load_lora_factors(Finetune.open(path), embedder.model, embedder.base).plain
    ref = DeltaEmbedder(tiny_base, method="reference", cache=False, progress=False)
    np.testing.assert_allclose(embedder.embed_one(path).vector, ref.embed_one(path).vector, atol=1e-6, rtol=0)


def test_bad_options_are_rejected(tiny_base):
    for kwargs in ({"pooling": "max"}, {"normalize": "l1"}, {"method": "magic"}, {"layer": 7}):
        with pytest.raises(ValueError):
            DeltaEmbedder(tiny_base, **kwargs)


def test_inference_does_not_track_gradients(tiny_base, adapters):
    embedder = DeltaEmbedder(tiny_base, cache=False, progress=False)
    embedder.embed_one(adapters[0])
    assert all(p.grad is None and not p.requires_grad for p in embedder.model.parameters())


def test_mixed_adapters_in_one_batch_equal_one_at_a_time(tiny_base, adapters, tmp_path):
    """Different ranks and target sets, a full model and a no-op share one chunk."""
    small = RandomAdapterFactory(tiny_base, r=2, targets=("q_proj", "v_proj"))
    odd = small.make(tmp_path / "r2-qv", seed=5, scale=0.3)
    merged = merge_adapter(tiny_base, adapters[3], tmp_path / "merged")
    sources = [adapters[0], odd, merged, adapters[1], adapters[2]]
    together = DeltaEmbedder(tiny_base, adapters_per_batch=5, cache=False, progress=False)
    alone = DeltaEmbedder(tiny_base, adapters_per_batch=1, cache=False, progress=False)
    np.testing.assert_allclose(together.transform(sources), alone.transform(sources), atol=1e-5, rtol=0)


def test_probe_set_in_every_prompt_format(tiny_base):
    from delta_router.embedding.probes import ProbeSet
    from delta_router.models.base import resolve_base

    probes = ProbeSet.formats(tokenizer=resolve_base(tiny_base).load_tokenizer())
    paper = ProbeSet.paper().texts
    assert len(probes) == 3 * len(paper) and probes.texts[: len(paper)] == paper
    assert all(t.startswith("Question: ") for t in probes.texts[-len(paper) :])
    assert len(set(probes.texts)) == len(probes) and probes.fingerprint != ProbeSet.paper().fingerprint


def test_plain_probes_use_no_template_and_the_data_free_map_reads_the_format_probes_by_default(tiny_base):
    from delta_router.data.templates import PAPER_PREAMBLES
    from delta_router.embedding.probes import PLAIN_TASKS, ProbeSet
    from delta_router.models.base import resolve_base
    from delta_router.routing.data_free import profile_embedder

    plain = ProbeSet.plain()
    assert len(plain) == len(PLAIN_TASKS) * len(PAPER_PREAMBLES) and len(set(plain.texts)) == len(plain)
    formats = ProbeSet.formats(tokenizer=resolve_base(tiny_base).load_tokenizer())
    assert not set(plain.texts) & set(formats.texts)
    assert all(any(t.startswith(p + " ") for p in PAPER_PREAMBLES) for t in plain.texts)
    assert not any("###" in t or "Question:" in t or "<|" in t for t in plain.texts)  # no template
    assert profile_embedder(tiny_base).probes == formats
    assert profile_embedder(tiny_base, deltas="plain").probes == plain


def test_concurrent_embeds_from_threads_do_not_mix_adapters(tiny_base, adapters, monkeypatch):
    """The server embeds registrations from several threads with one embedder: each thread's forward
    must see only its own adapter (two threads are held inside the forward together if they can be)."""
    import contextlib
    import threading

    expected = DeltaEmbedder(tiny_base, cache=False, progress=False).transform(adapters[:2])
    embedder = DeltaEmbedder(tiny_base, cache=False, progress=False)
    embedder.base_activations()
    both_inside = threading.Barrier(2, timeout=1.0)
    forward = embedder._forward

    def forward_together(groups: int = 1):
        # without a lock both threads' adapter hooks are now on the model; with one, the first times
        # out (the other thread is kept out) and goes on alone
        with contextlib.suppress(threading.BrokenBarrierError):
            both_inside.wait()
        return forward(groups)

    monkeypatch.setattr(embedder, "_forward", forward_together)
    got: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: got.update({i: embedder.transform([adapters[i]])[0]}))
               for i in range(2)]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        assert np.allclose(got[i], expected[i], atol=1e-5)


def test_embedders_sharing_a_live_model_hold_one_base_and_follow_its_weights(
    tiny_base, other_base, adapters, tmp_path
):
    from delta_router import ProbeSet

    index = DeltaEmbedder(tiny_base, cache=False, progress=False)
    formats = ProbeSet.formats(tokenizer=index.tokenizer)
    options = {"normalize": "probe", "cache": False, "progress": False}
    profile = DeltaEmbedder(tiny_base, formats, **options, live=index.live)
    alone = DeltaEmbedder(tiny_base, formats, **options)
    full = merge_adapter(tiny_base, adapters[1], tmp_path / "full")
    index.embed_one(full)  # swaps a full finetune's weights into the shared model
    assert profile.model is index.model
    np.testing.assert_allclose(
        profile.embed_one(adapters[0]).vector, alone.embed_one(adapters[0]).vector, atol=1e-5
    )
    np.testing.assert_allclose(index.embed_one(full).vector, DeltaEmbedder(
        tiny_base, cache=False, progress=False).embed_one(full).vector, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="shared live model"):
        DeltaEmbedder(other_base, cache=False, progress=False, live=index.live)


def test_a_corrupt_cache_entry_is_recomputed(tiny_base, adapters, caplog):
    from delta_router.home import home

    first = DeltaEmbedder(tiny_base, progress=False).embed_one(adapters[0]).vector
    cached = sorted(home().glob("embeddings/*/*.npy")) + sorted(home().glob("activations/*.npy"))
    assert len(cached) == 2
    cached[0].write_bytes(cached[0].read_bytes()[:100])  # truncated
    np.save(cached[1], np.zeros(3, dtype=np.float32))  # valid, but not what was stored
    again = DeltaEmbedder(tiny_base, progress=False).embed_one(adapters[0]).vector
    np.testing.assert_allclose(again, first, atol=1e-6)
    assert "recomputing" in caplog.text
    assert DeltaEmbedder(tiny_base, progress=False).embed_one(adapters[0]).vector.shape == first.shape
