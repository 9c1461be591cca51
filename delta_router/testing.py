"""Builders for tests and benchmarks: a tiny random Llama base and random LoRA adapters.

Nothing here touches a model hub: the tiny base gets a byte-level BPE tokenizer trained on the fly.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from delta_router.data.templates import PAPER_PREAMBLES, alpaca_prompt
from delta_router.models.base import resolve_base
from delta_router.models.finetunes import fold_lora
from delta_router.training.trainer import LORA_TARGETS


def make_tiny_tokenizer(extra_text: list[str] | None = None, vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on the probe templates (+ ``extra_text``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [alpaca_prompt("Please provide a response.", "Input.", p) for p in PAPER_PREAMBLES]
    tok.train_from_iterator(corpus + list(extra_text or []), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_tiny_base(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a random Llama (hidden 64, 2 layers by default) + tokenizer as an HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


class RandomAdapterFactory:
    """Writes random LoRA adapters of one base, reusing a single PEFT model (fast for many).

    ``init_lora_weights=False`` makes both factors random; PEFT's default B = 0 would be a no-op.
    """

    def __init__(
        self, base_dir: str | Path, r: int = 8, alpha: int = 16, targets=LORA_TARGETS, **lora_options
    ):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.base_dir = str(base_dir)
        model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32)
        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=list(targets),
            init_lora_weights=False,
            **lora_options,
        )
        self.model = get_peft_model(model, config)
        self.model.peft_config["default"].base_model_name_or_path = self.base_dir

    def randomize(self, seed: int, scale: float = 1.0) -> None:
        """Fresh random factors (nn.Linear's init, what ``init_lora_weights=False`` leaves)."""
        torch.manual_seed(seed)
        for module in self._lora_layers():
            module.lora_A["default"].reset_parameters()
            module.lora_B["default"].reset_parameters()
            with torch.no_grad():
                module.lora_B["default"].weight.mul_(scale)

    def make(
        self,
        out_dir: str | Path,
        seed: int,
        scale: float = 1.0,
        family: int | None = None,
        spread: float = 0.5,
    ) -> Path:
        """A random adapter directory at ``out_dir``.

        With ``family``, the factors are those of adapter ``family`` plus ``spread`` times this
        seed's own: adapters of one family are related, as finetunes of one domain would be.
        """
        if family is None:
            self.randomize(seed, scale)
        else:
            self.randomize(family, scale)
            shared = [p.detach().clone() for p in self._lora_params()]
            self.randomize(seed, scale)
            with torch.no_grad():
                for param, base in zip(self._lora_params(), shared, strict=True):
                    param.mul_(spread).add_(base)
        self.model.save_pretrained(str(out_dir))
        return Path(out_dir)

    def _lora_layers(self):
        from peft.tuners.lora import LoraLayer

        return [m for m in self.model.modules() if isinstance(m, LoraLayer)]

    def _lora_params(self) -> list[torch.Tensor]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n]


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Merge a LoRA adapter into its base (``fold_lora``) and save a full model directory."""
    base = resolve_base(base_dir)
    fold_lora(base.load_model(), adapter_dir).save_pretrained(str(out_dir))
    base.load_tokenizer().save_pretrained(str(out_dir))
    return Path(out_dir)


SYNTHETIC_WORDS = {
    "fruit": ("apple", "banana", "cherry", "mango", "pear", "plum"),
    "digits": ("17", "42", "93", "5", "808", "61"),
}


def synthetic_domain(name: str, n: int = 120, seed: int = 0):
    """``DomainSplits`` of a synthetic domain whose texts draw on one vocabulary (``SYNTHETIC_WORDS``).

    Multiple choice between two of its words; 20 test, 10 few-shot, 3 training thirds of 30.
    """
    from delta_router.data import DomainSplits, Record

    rng = random.Random(f"{name}-{seed}")
    words = SYNTHETIC_WORDS[name]
    records = []
    for _ in range(n):
        text = " ".join(rng.choices(words, k=4))
        gold, other = rng.sample(words, 2)
        answer = rng.randrange(2)
        choices = (gold, other) if answer == 0 else (other, gold)
        records.append(Record(f"Name a {name} item.", text, f"{gold} {gold}", choices, answer))
    third = (n - 30) // 3
    train = [records[30 + i * third : 30 + (i + 1) * third] for i in range(3)]
    return DomainSplits(name, train, records[20:30], records[:20], {"domain": name, "seed": seed})


def tiny_wild_zoo(base, root: str | Path):
    """A ``Zoo`` of the ``wild`` kind over the synthetic domains, quick to build on the tiny base.

    Each domain has a second dataset (``<domain>-b``, another draw) whose training thirds also hold
    the first test record of ``fruit``, which the zoo must keep out of training.
    """
    from dataclasses import replace

    from delta_router.training.trainer import TrainConfig
    from delta_router.zoo.wild import WildSpec
    from delta_router.zoo.zoo import Zoo

    datasets = {d: {d: d, f"{d}-b": f"{d}-b"} for d in SYNTHETIC_WORDS}
    spec = WildSpec("wild-tiny", tuple(SYNTHETIC_WORDS), train_size=24, datasets=datasets, per_domain=3,
                    full=1, generalists=1, steps=(2, 3), strong_steps=4, general_steps=2, full_steps=2,
                    train=TrainConfig(batch_size=4, micro_batch_size=4))  # fmt: skip
    splits = {name: synthetic_domain(name) for name in SYNTHETIC_WORDS}
    leaked = splits["fruit"].test[0]
    for name in SYNTHETIC_WORDS:
        other = synthetic_domain(name, seed=1)
        splits[f"{name}-b"] = replace(other, train=[[leaked, *third] for third in other.train])
    return Zoo(spec, base, root=Path(root), progress=False, splits=splits)


def write_v1_index(directory: str | Path, rows, kind: str = "flat") -> Path:
    """Write ``[(Embedding, tags), ...]`` as an index of format 1 (``meta.json`` + ``data-<sha>.npz``),
    the layout before SQLite, for the migration tests."""
    import hashlib
    import io
    import json

    import numpy as np

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, vectors=np.stack([e.vector for e, _ in rows]).astype(np.float32))
    digest = hashlib.sha256(buf.getbuffer()).hexdigest()
    data_name = f"data-{digest[:16]}.npz"
    (directory / data_name).write_bytes(buf.getvalue())
    meta = {
        "format_version": 1, "kind": kind, "params": {"hnsw_m": 32, "ivf_nlist": None},
        "space": rows[0][0].space.to_dict(), "next_id": len(rows), "data_file": data_name,
        "data_sha256": digest,
        "entries": [{"faiss_id": i, "tags": tags, "embedding": e.to_dict(False)}
                    for i, (e, tags) in enumerate(rows)],
    }  # fmt: skip
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))
    return directory


def snapshot(root: str | Path) -> dict[str, str]:
    """Every file and directory under ``root`` -> a hash of its content, to assert nothing changed.

    A SQLite database is hashed by its SQL dump: reading one rewrites its ``-shm`` index and may
    fold its ``-wal`` journal into the main file, which changes bytes but no data (both skipped).
    """
    import contextlib
    import hashlib
    import sqlite3

    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.name.endswith(("-wal", "-shm")):
            continue
        data = b"dir" if path.is_dir() else path.read_bytes()
        if path.suffix == ".sqlite":
            with contextlib.suppress(sqlite3.DatabaseError), contextlib.closing(sqlite3.connect(path)) as db:
                data = "\n".join(db.iterdump()).encode()
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out
