"""Per-example scoring on a CUDA device equals the CPU's (skipped where there is no GPU).

Kept apart from test_gpu.py, which needs lm-eval: this one needs only torch, transformers and PEFT,
so it also runs on a bare GPU image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from delta_router.evaluation.scoring import example_scores
from delta_router.merging.candidates import Candidate, DeltaPatcher
from delta_router.models.base import resolve_base
from delta_router.models.finetunes import Finetune
from delta_router.testing import synthetic_domain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_shared_prompt_scores_and_patched_merges_on_cuda_equal_the_cpu_ones(tiny_base, adapters):
    base = resolve_base(tiny_base)
    tokenizer = base.load_tokenizer()
    records = synthetic_domain("fruit").test
    merge = Candidate("mix", "merge", tuple((Finetune.open(a), 0.5) for a in adapters[:2]))
    results = []
    for device in ("cpu", "cuda"):
        model = base.load_model(device=device)
        with DeltaPatcher(model, base).patched(merge) as patched:
            results.append(example_scores(patched, tokenizer, records))
    cpu, cuda = results
    np.testing.assert_allclose(cuda.gold_logprob, cpu.gold_logprob, atol=1e-3)
    np.testing.assert_array_equal(cuda.correct, cpu.correct)
