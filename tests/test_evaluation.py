"""lm-eval integration on the tiny base: local task YAMLs load offline and agree with our scorer."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from delta_router.cli import main
from delta_router.data import Record, write_records
from delta_router.evaluation.harness import LmEvaluator, load_for_eval, write_tasks
from delta_router.evaluation.scoring import score_records
from delta_router.models.base import resolve_base
from delta_router.testing import synthetic_domain


def word_problems(n: int = 6) -> list[Record]:
    solution = "{i} + {i} = {s}. So the answer is {s}."
    return [
        Record("Solve the math word problem.", f"What is {i} + {i}?", solution.format(i=i, s=2 * i))
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    held_out = {"fruit": synthetic_domain("fruit").test, "math": word_problems()}
    return write_tasks(held_out, tmp_path_factory.mktemp("tasks"))


def test_task_configs_are_local_and_load_offline(tasks_dir):
    evaluator = LmEvaluator(tasks_dir)
    assert evaluator.tasks == ["dr_fruit", "dr_math", "dr_math_gen"]
    config = yaml.safe_load((tasks_dir / "dr_fruit.yaml").read_text())
    assert config["output_type"] == "multiple_choice"
    assert config["dataset_kwargs"]["data_files"]["test"] == str(tasks_dir / "dr_fruit.jsonl")
    rows = [json.loads(line) for line in (tasks_dir / "dr_math.jsonl").read_text().splitlines()]
    assert rows[3]["final_answer"] == "6"


def test_lm_eval_accuracy_equals_our_loglikelihood_scorer(tasks_dir, tiny_base):
    model, tokenizer = load_for_eval("base", resolve_base(tiny_base))
    results = LmEvaluator(tasks_dir, batch_size=8).evaluate(model, tokenizer, ["dr_fruit", "dr_math"])
    ours = score_records(model, tokenizer, synthetic_domain("fruit").test)
    assert results["dr_fruit"]["acc"] == pytest.approx(ours.acc)
    assert results["dr_fruit"]["acc_norm"] == pytest.approx(ours.acc_norm)
    assert results["dr_math"]["loglik"] < 0.0


def test_long_answers_score_without_overflow(tiny_base, tmp_path):
    """An answer's NLL past ~709 nats overflowed lm-eval's perplexity (exp); loglik is its mean."""
    answer = "lorem ipsum dolor sit amet, " * 12
    tasks = write_tasks(
        {"essay": [Record("Write an essay.", f"Topic {i}.", answer) for i in range(3)]}, tmp_path
    )
    model, tokenizer = load_for_eval("base", resolve_base(tiny_base))
    loglik = LmEvaluator(tasks).evaluate(model, tokenizer, ["dr_essay"])["dr_essay"]["loglik"]
    assert math.isfinite(loglik) and loglik < -710.0  # the regime where exp(-loglik) overflows


def test_generative_task_runs_with_a_limit(tasks_dir, tiny_base):
    model, tokenizer = load_for_eval("base", resolve_base(tiny_base))
    results = LmEvaluator(tasks_dir, limit=2).evaluate(model, tokenizer, ["dr_math_gen"])
    assert 0.0 <= results["dr_math_gen"]["exact_match"] <= 1.0


def test_cli_eval_scores_base_and_adapter_on_user_examples(tiny_base, adapters, tmp_path, capsys):
    examples = tmp_path / "held_out.jsonl"
    write_records(examples, synthetic_domain("digits").test[:8])
    out = tmp_path / "results.json"
    argv = ["eval", "base", str(adapters[0]), "--examples", str(examples), "--base", str(tiny_base)]
    assert main([*argv, "--out", str(out), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert set(results) == {"base", str(adapters[0])}
    assert all(0.0 <= r["dr_user"]["acc"] <= 1.0 for r in results.values())
    assert json.loads(out.read_text()) == results
    assert main(["eval", "base", "--base", str(tiny_base)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_shared_context_scoring_equals_lm_eval_per_request(tiny_base):
    """One context pass + cached continuations gives HFLM's log-probs and greedy flags."""
    import torch
    from lm_eval.models.huggingface import HFLM

    from delta_router.evaluation.shared_context import SharedContextHFLM

    model, tokenizer = load_for_eval("base", resolve_base(tiny_base))
    gen = torch.Generator().manual_seed(0)
    requests = []
    for n_choices in (4, 2, 1, 3):
        context = torch.randint(
            3, 200, (int(torch.randint(5, 30, (1,), generator=gen)),), generator=gen
        ).tolist()
        for _ in range(n_choices):
            length = int(torch.randint(1, 6, (1,), generator=gen))
            requests.append(
                (("ctx", "cont"), context, torch.randint(3, 200, (length,), generator=gen).tolist())
            )
        greedy = model.generate(torch.tensor([context]), max_new_tokens=3, do_sample=False)[0, len(context) :]
        requests.append((("ctx", "greedy"), context, greedy.tolist()))
    kwargs = {"pretrained": model, "tokenizer": tokenizer, "device": "cpu", "batch_size": 4}
    expected = HFLM(**kwargs)._loglikelihood_tokens(requests, disable_tqdm=True)
    shared = SharedContextHFLM(**kwargs)._loglikelihood_tokens(requests, disable_tqdm=True)
    assert [g for _, g in shared] == [g for _, g in expected]
    assert sum(g for _, g in shared) >= 4  # the greedy continuations are recognised as such
    torch.testing.assert_close(torch.tensor([s for s, _ in shared]), torch.tensor([s for s, _ in expected]))
