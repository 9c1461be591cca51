"""LoraHub: factor-wise composition, the weight search, and the saved adapter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from delta_router.errors import MergeError
from delta_router.merging.lorahub import LoraHub
from delta_router.merging.merger import PROVENANCE_FILE
from delta_router.models.lora_batch import lora_hooks
from delta_router.testing import RandomAdapterFactory, synthetic_domain


@pytest.fixture(scope="module")
def hub(tiny_base, adapters) -> LoraHub:
    return LoraHub(tiny_base, adapters[:3], budget=12, progress=False)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_one_hot_weights_compose_to_that_adapter(hub, adapters):
    from peft import PeftModel

    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with lora_hooks(hub.model, [hub.compose([0.0, 1.0, 0.0])]):
        composed = _logits(hub.model, ids)
    single = PeftModel.from_pretrained(hub.base.load_model(), str(adapters[1])).eval()
    torch.testing.assert_close(composed, _logits(single, ids), rtol=1e-4, atol=1e-4)
    # The factors are combined, not the updates: weight 2 on one adapter scales its update by 4.
    a, b, _ = hub.compose([0.0, 2.0, 0.0]).factors[hub.modules[0]]
    a1, b1, _ = hub.compose([0.0, 1.0, 0.0]).factors[hub.modules[0]]
    torch.testing.assert_close(b @ a, 4 * (b1 @ a1))


def test_search_returns_the_best_weights_it_saw(hub, tmp_path):
    records = synthetic_domain("fruit").fewshot[:4]
    hub.fit(records)
    assert hub.weights_.shape == (3,) and np.all(np.abs(hub.weights_) <= hub.bound)
    # The start (the base) and each adapter alone are simplex vertices: the result is no worse.
    batches = hub._batches(records)
    for start in [np.zeros(3), *np.eye(3)]:
        assert hub.loss_ <= hub.loss(start, batches) + 1e-9
    assert hub.loss(hub.weights_, batches) == pytest.approx(hub.loss_)
    again = LoraHub(hub.base, hub.finetunes, budget=12, progress=False).fit(records)
    np.testing.assert_array_equal(again.weights_, hub.weights_)  # deterministic

    from peft import PeftModel

    out = hub.save(tmp_path / "hub")
    saved = PeftModel.from_pretrained(hub.base.load_model(), str(out)).eval()
    ids = torch.tensor([[2, 4, 6, 8, 10]])
    with lora_hooks(hub.model, [hub.compose(hub.weights_)]):
        expected = _logits(hub.model, ids)
    torch.testing.assert_close(_logits(saved, ids), expected, rtol=1e-4, atol=1e-4)
    record = json.loads((out / PROVENANCE_FILE).read_text())
    assert [m["weight"] for m in record["models"]] == pytest.approx(list(hub.weights_))
    with pytest.raises(FileExistsError):
        hub.save(out)


def test_bad_inputs_are_refused(tiny_base, adapters, tmp_path):
    other_rank = RandomAdapterFactory(tiny_base, r=4).make(tmp_path / "r4", seed=0, scale=0.1)
    with pytest.raises(MergeError, match="rank"):
        LoraHub(tiny_base, [adapters[0], other_rank], progress=False)
    with pytest.raises(MergeError, match="before fit"):
        LoraHub(tiny_base, adapters[:2], progress=False).save(tmp_path / "never")
    assert not (tmp_path / "never").exists()
