"""Base resolution, fingerprints and the paper's probes."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from delta_router import ProbeSet, resolve_base
from delta_router.errors import BaseModelError
from delta_router.testing import make_tiny_base


def test_local_directory_and_fingerprint(tiny_base, tmp_path):
    base = resolve_base(tiny_base)
    fp = base.fingerprint
    assert (fp.hidden_size, fp.num_layers) == (64, 2)
    assert resolve_base(shutil.copytree(tiny_base, tmp_path / "copy")).fingerprint == fp
    other = resolve_base(make_tiny_base(tmp_path / "reseeded", seed=5)).fingerprint
    assert other != fp and (other.hidden_size, other.num_layers) == (64, 2)


def test_unresolvable_bases_say_how_to_fix_it(adapters, tmp_path):
    with pytest.raises(BaseModelError, match="HF_HUB_OFFLINE=0"):
        resolve_base("someone/definitely-not-cached-model")
    with pytest.raises(BaseModelError, match="adapter, not a base"):
        resolve_base(adapters[0])
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaseModelError, match="not an HF model directory"):
        resolve_base(tmp_path / "empty")


def test_a_broken_base_directory_is_named_not_a_traceback(tiny_base, adapters, tmp_path):
    from delta_router import DeltaEmbedder

    corrupt = shutil.copytree(tiny_base, tmp_path / "corrupt")
    weights = next(corrupt.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:3000])
    with pytest.raises(BaseModelError, match="corrupt safetensors"):
        resolve_base(corrupt).fingerprint  # noqa: B018
    with pytest.raises(BaseModelError, match="cannot load the model"):
        resolve_base(corrupt).load_model()
    untokenized = shutil.copytree(tiny_base, tmp_path / "untokenized")
    for file in untokenized.glob("tok*"):
        file.unlink()
    with pytest.raises(BaseModelError, match="no usable tokenizer in .*untokenized"):
        resolve_base(untokenized).load_tokenizer()
    with pytest.raises(BaseModelError, match="no usable tokenizer"):
        DeltaEmbedder(untokenized, cache=False, progress=False).embed_one(adapters[0])


def test_texts_without_tokens_are_refused(tiny_base):
    from delta_router import DeltaEmbedder
    from delta_router.errors import DataError, ProbeError

    embedder = DeltaEmbedder(tiny_base, cache=False, progress=False)
    with pytest.raises(DataError, match="text 1 .* has no tokens"):
        embedder.text_activations(["a query", ""])

    def no_tokens(texts, **_):  # a base whose tokenizer knows none of the probes' text
        empty = torch.zeros(len(texts), 0, dtype=torch.long)
        return {"input_ids": empty, "attention_mask": empty}

    embedder.__dict__["tokenizer"] = no_tokens
    with pytest.raises(ProbeError, match="probe 0 of 'paper' has no tokens .* tokenizer files"):
        embedder.probe_batch  # noqa: B018


def test_paper_probes_are_exactly_the_papers():
    probes = ProbeSet.paper()
    assert len(probes) == 5
    assert probes.texts[0] == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nPlease provide a response. Input:Input."
        "\n\n### Response:"
    )
    assert all(t.endswith("Input:Input.\n\n### Response:") for t in probes.texts)
    assert len(set(probes.texts)) == 5


@pytest.fixture()
def all_threads():
    """A real model wants every core (conftest pins tests to one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_embedded_smollm2_end_to_end(tmp_path, all_threads):
    """The real default base: fetched from PyPI, dequantised, and a LoRA of it embedded."""
    from delta_router import DeltaEmbedder
    from delta_router.testing import RandomAdapterFactory

    base = resolve_base("smollm2-135m")
    assert base.fingerprint.hidden_size == 576 and base.fingerprint.num_layers == 30
    assert "quantization_config" not in (base.path / "config.json").read_text()
    adapter = RandomAdapterFactory(base.path).make(tmp_path / "a", seed=0, scale=0.01)
    fast = DeltaEmbedder(base, cache=False, progress=False).embed_one(adapter).vector
    ref = DeltaEmbedder(base, method="reference", cache=False, progress=False)
    slow = ref.embed_one(adapter).vector
    assert fast.shape == (576,) and abs(fast).max() > 0
    assert abs(fast - slow).max() < 1e-3 * max(1.0, abs(slow).max())
