"""On a CUDA device the toolkit gives the CPU's results (skipped where there is no GPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from delta_router import DeltaEmbedder
from delta_router.evaluation.harness import LmEvaluator, load_for_eval, write_tasks
from delta_router.models.base import resolve_base
from delta_router.routing.router import BASE_ADAPTER
from delta_router.serving.backends import GenerationRequest, PeftBackend
from delta_router.testing import synthetic_domain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_delta_embeddings_on_cuda_equal_the_cpu_ones(tiny_base, adapters):
    cpu = DeltaEmbedder(tiny_base, cache=False, progress=False).transform(adapters)
    cuda = DeltaEmbedder(tiny_base, device="cuda", cache=False, progress=False).transform(adapters)
    np.testing.assert_allclose(cuda, cpu, atol=1e-4 * np.abs(cpu).max())


def test_lm_eval_scores_on_cuda_equal_the_cpu_ones(tiny_base, tmp_path):
    tasks = write_tasks({"fruit": synthetic_domain("fruit").test}, tmp_path / "tasks")
    model, tokenizer = load_for_eval("base", resolve_base(tiny_base))
    cpu = LmEvaluator(tasks, batch_size=8).evaluate(model, tokenizer, ["dr_fruit"])["dr_fruit"]
    model.to("cuda")
    for shared in (False, True):  # HFLM is the default on a GPU; the shared-context path also runs
        evaluator = LmEvaluator(tasks, batch_size=8, shared_context=shared)
        assert evaluator.evaluate(model, tokenizer, ["dr_fruit"])["dr_fruit"] == pytest.approx(cpu)


def test_mixed_adapter_generation_on_cuda_equals_the_cpu_one(tiny_base, adapters):
    requests = [GenerationRequest("Fruit: apple, pear,", a, max_tokens=6) for a in ("a0", "a1", BASE_ADAPTER)]
    served = {"a0": adapters[0], "a1": adapters[1]}
    backends = {d: PeftBackend(resolve_base(tiny_base), served, device=d) for d in ("cpu", "cuda")}
    texts = {d: [r.text for r in backend.generate(requests)] for d, backend in backends.items()}
    assert texts["cuda"] == texts["cpu"]
