"""build's select -> merge -> verify: per-record scores, in-memory candidates, the decision rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from delta_router.data import Record
from delta_router.data.sequences import encode
from delta_router.evaluation.scoring import ExampleScores, choice_logprobs, example_scores, sequence_logprobs
from delta_router.evaluation.verification import Gain, choose
from delta_router.merging.candidates import Candidate, DeltaPatcher
from delta_router.merging.merger import Merger
from delta_router.model_ids import BASE_MODEL_NAME
from delta_router.models.base import resolve_base
from delta_router.models.finetunes import Finetune
from delta_router.testing import merge_adapter, synthetic_domain


def mixed_records() -> list[Record]:
    """Prompts of many lengths, 2-4 choices of 1+ tokens, and one record cut to fit max_length."""
    records = synthetic_domain("fruit").test[:8]
    long = Record("Name a fruit item.", "plum " * 300, "x", ("apple pie", "pear"), 1)
    four = Record("Pick.", "apple banana", "cherry", ("cherry", "mango plum", "pear", "apple apple"), 0)
    return [*records, long, four]


def test_shared_prompt_scoring_equals_scoring_each_sequence(tiny_base):
    base = resolve_base(tiny_base)
    model, tokenizer = base.load_model(), base.load_tokenizer()
    records = mixed_records()
    seqs = [[encode(tokenizer, r.prompt(), c, 64) for c in r.choices] for r in records]
    shared = torch.cat(choice_logprobs(model, seqs, tokenizer.pad_token_id, batch_size=3))
    alone = sequence_logprobs(model, [s for group in seqs for s in group], tokenizer.pad_token_id)
    torch.testing.assert_close(shared, alone, atol=1e-4, rtol=1e-5)


def test_example_scores_summarise_to_the_score_and_reorder(tiny_base):
    base = resolve_base(tiny_base)
    model, tokenizer = base.load_model(), base.load_tokenizer()
    records = synthetic_domain("fruit").test[:6]
    scores = example_scores(model, tokenizer, records)
    assert scores.n == 6 and ((scores.gold_prob > 0) & (scores.gold_prob < 1)).all()
    assert scores.summary().acc == pytest.approx(scores.correct.mean()) == pytest.approx(scores.main.mean())
    halves = ExampleScores.concat([scores.subset([3, 4, 5]), scores.subset([0, 1, 2])])
    np.testing.assert_array_equal(halves.subset([3, 4, 5, 0, 1, 2]).gold_prob, scores.gold_prob)
    free = [Record("Say it.", "", "apple banana")] * 2
    free_scores = example_scores(model, tokenizer, free)
    assert free_scores.gold_prob is None
    assert free_scores.summary().main == pytest.approx(free_scores.main.mean())  # equal-length answers


@pytest.mark.parametrize("weights", [(0.5, 0.3, 0.2), (1.2, -0.4, 0.3)])
def test_patched_candidate_is_the_model_mergekit_writes(tiny_base, adapters, tmp_path, weights):
    base = resolve_base(tiny_base)
    members = tuple((Finetune.open(path), w) for path, w in zip(adapters[:3], weights, strict=True))
    candidate = Candidate("mix", "merge", members)
    written = Merger(base, candidate.recipe(), progress=False).merge(
        [ft for ft, _ in members], tmp_path / "merged", weights=list(weights)
    )
    expected = resolve_base(written).load_model().state_dict()
    model = base.load_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with DeltaPatcher(model, base).patched(candidate) as patched:
        for name, value in patched.state_dict().items():
            torch.testing.assert_close(value, expected[name], atol=1e-5, rtol=1e-5)
    for name, value in model.state_dict().items():  # restored exactly
        assert torch.equal(value, before[name])


def test_full_finetunes_patch_as_their_difference_from_the_base(tiny_base, adapters, tmp_path):
    base = resolve_base(tiny_base)
    full = Finetune.open(merge_adapter(tiny_base, adapters[0], tmp_path / "full"))
    lora = Finetune.open(adapters[0])
    model = base.load_model()
    patcher = DeltaPatcher(model, base)
    with patcher.patched(Candidate("full", "single", ((full, 1.0),))) as patched:
        from_full = {k: v.clone() for k, v in patched.state_dict().items()}
    with patcher.patched(Candidate("lora", "single", ((lora, 1.0),))) as patched:
        for name, value in patched.state_dict().items():
            torch.testing.assert_close(value, from_full[name], atol=1e-5, rtol=1e-5)


def scores_of(utility: np.ndarray) -> ExampleScores:
    n = len(utility)
    return ExampleScores(np.zeros(n), np.ones(n), utility > 0.5, utility > 0.5, utility)


def test_choose_keeps_the_base_unless_a_gain_clears_the_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.6, 20)
    noisy = base + rng.normal(0.0, 0.1, 20)  # no real gain
    clear = base + 0.15 + rng.normal(0.0, 0.02, 20)
    worse = base - 0.1
    names, others = ("noisy", "clear", "worse"), (noisy, clear, worse)
    kept = choose(scores_of(base), [("noisy", "merge", scores_of(noisy), False)])
    assert kept.kept_base and kept.chosen == BASE_MODEL_NAME and "no candidate beats the base" in kept.reason
    verdict = choose(
        scores_of(base),
        [(name, "merge", scores_of(u), False) for name, u in zip(names, others, strict=True)],
    )
    assert verdict.chosen == "clear" and "beats the base" in verdict.reason
    gain = verdict.result("clear").gain
    assert gain.interval.low < gain.interval.mean < gain.interval.high and gain.bound > 0
    assert verdict.result("worse").gain.interval.high < 0


def test_more_candidates_make_the_bound_stricter():
    rng = np.random.default_rng(1)
    base, cand = rng.uniform(0, 1, 20), rng.uniform(0, 1, 20) + 0.1
    assert Gain.paired(cand, base, comparisons=10).bound < Gain.paired(cand, base, comparisons=1).bound
    with pytest.raises(ValueError, match="scored on 3 records"):
        choose(scores_of(base), [("short", "merge", scores_of(cand[:3]), False)])


def test_selection_prior_keeps_its_merge_unless_the_examples_show_harm_or_a_clear_winner():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.2, 0.6, 20)
    neutral = base + rng.normal(0.0, 0.1, 20)
    harmful, clear = base - 0.2 + rng.normal(0.0, 0.02, 20), base + 0.2 + rng.normal(0.0, 0.02, 20)

    def verdict(prior: np.ndarray, *others: np.ndarray):
        rows = [("merge", "merge", scores_of(prior), False)]
        rows += [(f"other-{i}", "single", scores_of(u), False) for i, u in enumerate(others)]
        return choose(scores_of(base), rows, default="merge")

    kept = verdict(neutral)
    assert kept.chosen == "merge" and "not shown to hurt" in kept.reason
    assert verdict(harmful).chosen == BASE_MODEL_NAME and "hurts on the examples" in verdict(harmful).reason
    # once the prior is shown to hurt, the best mean gain among the rest is returned if it is above 0,
    # even short of a clear win; a candidate that loses on average is not
    hopeful, losing = base + np.tile([0.2, -0.15], 10), base - 0.05 + rng.normal(0.0, 0.02, 20)
    assert verdict(harmful, hopeful).result("other-0").gain.bound < 0 < hopeful.mean() - base.mean()
    assert verdict(harmful, losing, hopeful).chosen == "other-1"
    assert "the best estimate of the rest" in verdict(harmful, hopeful).reason
    assert verdict(harmful, losing).chosen == BASE_MODEL_NAME
    assert verdict(neutral, hopeful).chosen == "merge"  # a prior not shown to hurt stays
    assert verdict(harmful, clear).chosen == "other-0"
    assert verdict(neutral, clear).chosen == "other-0"
    assert verdict(neutral).with_prior(None).chosen == BASE_MODEL_NAME  # the same scores, the base prior
