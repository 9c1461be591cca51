"""Sequences, the LoRA trainer and the loglikelihood scorer on the tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch

from delta_router.data import Record
from delta_router.data.sequences import IGNORE_INDEX, collate, encode
from delta_router.errors import DeltaRouterError
from delta_router.evaluation.scoring import score_records
from delta_router.models.base import resolve_base
from delta_router.training.trainer import TRAINING_FILE, LoraTrainer, TrainConfig, batch_order

RECORDS = [Record("Repeat the fruit.", f"item {i}", "apple apple apple") for i in range(24)]
FAST = TrainConfig(max_steps=6, batch_size=4, micro_batch_size=2, learning_rate=1e-2, checkpoint_every=2)


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    return resolve_base(tiny_base).load_tokenizer()


def test_prompt_and_padding_tokens_get_no_loss(tokenizer):
    short = encode(tokenizer, "### Response:", "yes", eos=True)
    long = encode(tokenizer, "a much longer prompt\n\n### Response:", "no no no")
    batch = collate([short, long], tokenizer.pad_token_id)
    for row, seq in enumerate((short, long)):
        labels = batch["labels"][row]
        assert torch.all(labels[: seq.n_prompt] == IGNORE_INDEX)
        assert torch.all(labels[len(seq.ids) :] == IGNORE_INDEX)
        assert labels[seq.n_prompt : len(seq.ids)].tolist() == list(seq.ids[seq.n_prompt :])
        assert batch["attention_mask"][row].sum() == len(seq.ids)
    assert short.ids[-1] == tokenizer.eos_token_id


def test_truncation_keeps_the_prompt_tail_and_the_answer_head(tokenizer):
    prompt = "word " * 200 + "\n\n### Response:"
    seq = encode(tokenizer, prompt, "the answer " * 100, max_length=64)
    assert len(seq.ids) == 64 and seq.n_continuation == 32
    tail = tokenizer("\n\n### Response:", add_special_tokens=False)["input_ids"]
    assert list(seq.ids[seq.n_prompt - len(tail) : seq.n_prompt]) == tail


def test_batch_order_is_seeded_and_covers_every_example_each_epoch():
    order = batch_order(10, 5, 4, seed=3)
    assert order == batch_order(10, 5, 4, seed=3) != batch_order(10, 5, 4, seed=4)
    assert sorted(order[0] + order[1]) == list(range(10)) == sorted(order[2] + order[3])


def test_a_few_steps_lower_the_loss_and_write_a_peft_adapter(tiny_base, tmp_path):
    run = LoraTrainer(tiny_base, FAST, progress=False).fit(RECORDS, tmp_path / "ad", {"domain": "fruit"})
    assert run.steps == 6 and len(run.losses) == 6
    assert run.losses[-1] < run.losses[0]
    assert (tmp_path / "ad" / "adapter_model.safetensors").exists()
    saved = json.loads((tmp_path / "ad" / TRAINING_FILE).read_text())
    assert saved["data"]["domain"] == "fruit" and saved["config"]["rank"] == 8
    assert len(saved["data"]["records_sha256"]) == 64


def test_training_is_deterministic_and_a_finished_run_is_reused(tiny_base, tmp_path, monkeypatch):
    first = LoraTrainer(tiny_base, FAST, progress=False).fit(RECORDS, tmp_path / "a")
    second = LoraTrainer(tiny_base, FAST, progress=False).fit(
        RECORDS, tmp_path / "new" / "dir" / "b"
    )  # checkpoints into a fresh parent
    assert first.losses == second.losses
    monkeypatch.setattr(LoraTrainer, "_step", lambda *a: pytest.fail("retrained a finished run"))
    again = LoraTrainer(tiny_base, FAST, progress=False).fit(RECORDS, tmp_path / "a")
    assert again.losses == first.losses


def test_an_interrupted_run_resumes_at_its_checkpoint(tiny_base, tmp_path, monkeypatch):
    full = LoraTrainer(tiny_base, FAST, progress=False).fit(RECORDS, tmp_path / "full")

    real_step, calls = LoraTrainer._step, []

    def crash_at_step_5(self, model, sequences, prefix=None):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(self, model, sequences, prefix)

    monkeypatch.setattr(LoraTrainer, "_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        LoraTrainer(tiny_base, FAST, progress=False).fit(RECORDS, tmp_path / "resumed")
    assert not (tmp_path / "resumed").exists()  # nothing half-written
    assert (tmp_path / ".resumed.ckpt").exists()

    calls.clear()
    monkeypatch.setattr(LoraTrainer, "_step", lambda *args: calls.append(1) or real_step(*args))
    resumed = LoraTrainer(tiny_base, FAST, progress=False).fit(RECORDS, tmp_path / "resumed")
    assert len(calls) == 2  # steps 5 and 6 only: the checkpoint was at step 4
    assert resumed.losses == pytest.approx(full.losses, abs=1e-5)
    assert not (tmp_path / ".resumed.ckpt").exists()


def test_other_data_into_a_trained_dir_needs_overwrite(tiny_base, tmp_path):
    LoraTrainer(tiny_base, FAST, progress=False).fit(RECORDS, tmp_path / "ad")
    other = [Record("Repeat the fruit.", "x", "pear")] * 8
    with pytest.raises(DeltaRouterError, match="other data or settings"):
        LoraTrainer(tiny_base, FAST, progress=False).fit(other, tmp_path / "ad")
    run = LoraTrainer(tiny_base, FAST, progress=False).fit(other, tmp_path / "ad", overwrite=True)
    assert run.data["num_records"] == 8


def test_multiple_choice_accuracy_matches_a_hand_computed_one(tiny_base, tokenizer):
    model = resolve_base(tiny_base).load_model()
    records = [
        Record("Pick one.", f"question {i}", c[a], choices=c, answer=a)
        for i, (c, a) in enumerate([(("red", "blue"), 0), (("cat", "dog", "a fish"), 2), (("yes", "no"), 1)])
    ]
    hand_correct = 0
    for record in records:
        totals = []
        for choice in record.choices:
            prompt_ids = tokenizer(record.prompt(), add_special_tokens=False)["input_ids"]
            cont_ids = tokenizer(" " + choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt_ids + cont_ids])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
            totals.append(sum(logprobs[len(prompt_ids) + j - 1, t].item() for j, t in enumerate(cont_ids)))
        hand_correct += max(range(len(totals)), key=totals.__getitem__) == record.answer
    score = score_records(model, tokenizer, records, batch_size=2)
    assert score.n == 3 and score.acc == pytest.approx(hand_correct / 3)
    assert score.nll > 0 and 0 <= score.acc_norm <= 1


def test_free_form_records_get_an_nll_that_training_lowers(tiny_base, tmp_path, tokenizer):
    base = resolve_base(tiny_base)
    before = score_records(base.load_model(), tokenizer, RECORDS[:6])
    assert before.acc is None and before.main == -before.nll
    LoraTrainer(tiny_base, FAST, progress=False).fit(RECORDS, tmp_path / "ad")
    from peft import PeftModel

    finetuned = PeftModel.from_pretrained(base.load_model(), str(tmp_path / "ad"))
    after = score_records(finetuned, tokenizer, RECORDS[:6])
    assert after.nll < before.nll


def test_a_huge_example_is_clipped_before_the_tokenizer_with_a_warning(tokenizer, caplog):
    """A multi-megabyte field never reaches the tokenizer whole: the result equals a short one's."""
    prompt = "word " * 1_000_000 + "\n\n### Response:"  # 5 MB
    with caplog.at_level("WARNING", logger="delta_router.data.sequences"):
        huge = encode(tokenizer, prompt, "the answer " * 500_000, max_length=64)
    assert "was cut to fit 64 tokens" in caplog.text
    short = encode(tokenizer, "word " * 400 + "\n\n### Response:", "the answer " * 300, max_length=64)
    assert huge == short


def test_embedder_and_router_clip_texts_to_their_context(tiny_base, caplog):
    from delta_router import DeltaEmbedder
    from delta_router.routing.router import QueryEncoder

    embedder = DeltaEmbedder(tiny_base, progress=False)
    huge = "word " * (embedder.max_tokens * 40)
    with caplog.at_level("WARNING", logger="delta_router.data.sequences"):
        acts = embedder.text_activations([huge, "word"])
        routed = QueryEncoder.for_model(embedder.model, embedder.tokenizer, max_length=16)([huge])
    assert acts.shape[0] == 2 and routed.shape[0] == 1 and "was cut" in caplog.text


@pytest.mark.parametrize("prompt_format", ["chat", "qa"])
def test_other_prompt_formats_train_on_their_own_prompt(tiny_base, tokenizer, tmp_path, prompt_format):
    record = RECORDS[0]
    prompt = record.formatted(prompt_format, tokenizer)
    assert "### Response:" not in prompt and "item 0" in prompt
    config = FAST.with_options(prompt_format=prompt_format)
    run = LoraTrainer(tiny_base, config, progress=False).fit(RECORDS, tmp_path / prompt_format)
    assert run.losses[-1] < run.losses[0] and run.config.prompt_format == prompt_format


def test_dora_and_rslora_adapters_are_saved_as_such(tiny_base, tmp_path):
    from delta_router.embedding.embedder import DeltaEmbedder

    config = FAST.with_options(use_dora=True, use_rslora=True, targets=("q_proj", "v_proj"), max_steps=2)
    LoraTrainer(tiny_base, config, progress=False).fit(RECORDS, tmp_path / "dora")
    saved = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    assert saved["use_dora"] and saved["use_rslora"] and set(saved["target_modules"]) == {"q_proj", "v_proj"}
    (vector,) = DeltaEmbedder(tiny_base, progress=False).embed([tmp_path / "dora"])
    assert float((vector.vector**2).sum()) > 0


def test_full_finetune_trains_only_the_last_blocks_and_saves_an_hf_model(tiny_base, tmp_path):
    from safetensors.torch import load_file

    from delta_router.models.finetunes import Finetune

    config = FAST.with_options(method="full", unfreeze_last=1, max_steps=4)
    run = LoraTrainer(tiny_base, config, progress=False).fit(RECORDS, tmp_path / "full")
    assert run.losses[-1] < run.losses[0]
    assert Finetune.open(tmp_path / "full").kind == "full"
    base = resolve_base(tiny_base)
    before = load_file(str(next(base.path.glob("*.safetensors"))))
    after = load_file(str(tmp_path / "full" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".layers.1." in k or k.endswith("norm.weight") for k in changed)
    assert not any(".layers.0." in k for k in changed)
    # A second fit with the same data and config reuses the directory.
    again = LoraTrainer(tiny_base, config, progress=False).fit(RECORDS, tmp_path / "full")
    assert again.losses == run.losses


def test_lora_in_the_last_blocks_only(tiny_base, tmp_path):
    from safetensors.torch import load_file

    config = FAST.with_options(lora_layers=1, max_steps=2)
    run = LoraTrainer(tiny_base, config, progress=False).fit(RECORDS, tmp_path / "last")
    weights = load_file(str(tmp_path / "last" / "adapter_model.safetensors"))
    assert weights and all(".layers.1." in k for k in weights)  # the tiny base has 2 blocks
    assert run.config.tags()["targets"].endswith("(last-1-blocks)")
    with pytest.raises(DeltaRouterError, match="lora_layers=3: the base has 2 blocks"):
        too_deep = config.with_options(lora_layers=3)
        LoraTrainer(tiny_base, too_deep, progress=False).fit(RECORDS, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_task_head_learns_the_examples_answer_base_rate(tiny_base, tmp_path, tokenizer):
    from peft import PeftModel

    from delta_router.evaluation.scoring import example_scores
    from delta_router.merging.build import TASK_HEAD_CONFIG

    def records(n: int, offset: int) -> list[Record]:  # 3 in 4 answers are "yes"
        return [Record("Is it so?", f"claim {offset + i}", ("yes", "no")[i % 4 == 3], choices=("yes", "no"),
                       answer=int(i % 4 == 3)) for i in range(n)]  # fmt: skip

    LoraTrainer(tiny_base, TASK_HEAD_CONFIG, progress=False).fit(records(20, 0), tmp_path / "head")
    base = resolve_base(tiny_base).load_model()
    held_out = records(40, 100)
    before = example_scores(base, tokenizer, held_out)
    head = PeftModel.from_pretrained(resolve_base(tiny_base).load_model(), tmp_path / "head")
    after = example_scores(head, tokenizer, held_out)
    assert after.correct.mean() == pytest.approx(0.75)  # it answers "yes": the examples' base rate
    assert after.gold_prob.mean() > before.gold_prob.mean()


@pytest.mark.parametrize("options", [{"lora_layers": 1}, {"method": "full", "unfreeze_last": 1}])
def test_frozen_blocks_run_once_and_train_as_a_full_forward_would(tiny_base, tmp_path, monkeypatch, options):
    from safetensors.torch import load_file

    from delta_router.training import prefix

    config = FAST.with_options(max_steps=8, **options)  # 8 steps of 4 over 24 records: some seen twice
    calls = []
    monkeypatch.setattr(prefix.FrozenPrefix, "answer_logprobs",
                        lambda self, *a, original=prefix.FrozenPrefix.answer_logprobs: calls.append(1) or
                        original(self, *a))  # fmt: skip
    cached = LoraTrainer(tiny_base, config, progress=False).fit(RECORDS, tmp_path / "cached")
    assert calls  # the trained block ran on the cached states
    monkeypatch.setattr(prefix, "PREFIX_CACHE_BYTES", 0)  # no room: every step runs every block
    calls.clear()
    plain = LoraTrainer(tiny_base, config, progress=False).fit(RECORDS, tmp_path / "plain")
    assert not calls
    assert cached.losses == pytest.approx(plain.losses, rel=1e-4)
    name = "model.safetensors" if "method" in options else "adapter_model.safetensors"
    a, b = load_file(str(tmp_path / "cached" / name)), load_file(str(tmp_path / "plain" / name))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
