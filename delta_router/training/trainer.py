"""Finetuning of a base model on instruction records, with completion-only loss: LoRA (with DoRA or
rsLoRA) or, with ``method="full"``, all weights of the last ``unfreeze_last`` blocks.

A small explicit loop rather than ``transformers.Trainer``: the batch order is a pure function of
(seed, step), so a run resumed from a checkpoint sees exactly the batches an uninterrupted run
would, and a finished run is a standard PEFT adapter directory plus ``training.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from delta_router.data.sequences import TokenSequence, answer_logprobs, collate, encode
from delta_router.errors import DeltaRouterError, InvalidModelError, OutputExistsError
from delta_router.home import atomic_directory, atomic_write_text, refuse_existing
from delta_router.models.base import DEFAULT_BASE, BaseLM, resolve_base
from delta_router.serialize import from_json, to_json
from delta_router.training.prefix import FrozenPrefix
from delta_router.versions import package_versions

if TYPE_CHECKING:
    from delta_router.data import Record

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAINING_FILE = "training.json"


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters; the defaults are the paper's LoRA recipe scaled to a 135M model.

    ``batch_size`` is the effective batch (examples per optimizer step), reached by accumulating
    micro-batches of ``micro_batch_size``. ``max_steps`` overrides ``epochs``; ``num_examples``
    trains on a seeded subset of the records. ``prompt_format`` is one of ``PROMPT_FORMATS``.
    ``method="full"`` trains every weight of the last ``unfreeze_last`` decoder blocks and the final
    norm (the LoRA fields are then unused) and saves an HF model directory.
    """

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = LORA_TARGETS
    dropout: float = 0.0
    learning_rate: float = 1e-3
    warmup_steps: int = 2
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    micro_batch_size: int = 8
    max_length: int = 256
    num_examples: int | None = None
    seed: int = 0
    checkpoint_every: int = 10
    prompt_format: str = "alpaca"
    use_rslora: bool = False
    use_dora: bool = False
    method: str = "lora"  # "lora" | "full"
    unfreeze_last: int = 2
    lora_layers: int | None = None  # LoRA modules in the last N decoder blocks only (None: every block)

    def to_dict(self) -> dict:
        return to_json(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        return from_json(cls, data)

    def tags(self) -> dict[str, str]:
        """The recipe as index tags: method (lora, rslora, dora, full), rank, targets, format, seed, steps."""
        if self.method == "full":
            method, rank, targets = "full", "-", f"last-{self.unfreeze_last}-blocks"
        else:
            method = "dora" if self.use_dora else "rslora" if self.use_rslora else "lora"
            rank, targets = str(self.rank), ",".join(t.removesuffix("_proj") for t in self.targets)
            if self.lora_layers:
                targets += f" (last-{self.lora_layers}-blocks)"
        steps = str(self.max_steps) if self.max_steps else f"{self.epochs:g} epochs"
        return {"method": method, "rank": rank, "targets": targets, "format": self.prompt_format,
                "seed": str(self.seed), "steps": steps}  # fmt: skip

    def with_options(self, **options) -> TrainConfig:
        """A copy with the options that are not None replaced."""
        return replace(self, **{k: v for k, v in options.items() if v is not None})


@dataclass
class TrainingRun:
    """What ``training.json`` records about one finished run."""

    adapter_dir: Path
    base: str
    base_fingerprint: str
    config: TrainConfig
    data: dict
    steps: int
    examples_seen: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    wall_time_s: float = 0.0
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return to_json(self)

    @classmethod
    def read(cls, adapter_dir: str | Path) -> TrainingRun:
        """The run recorded in ``adapter_dir``'s ``training.json`` (``adapter_dir`` is where it is now)."""
        path = Path(adapter_dir) / TRAINING_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as exc:
            raise InvalidModelError(f"{path}: corrupt JSON ({exc})") from exc
        return from_json(cls, data, InvalidModelError, {"adapter_dir": Path(adapter_dir)})


def records_hash(records: Sequence[Record]) -> str:
    """sha256 of the records as canonical JSONL (identifies the exact training data)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps(record.to_dict(), sort_keys=True).encode() + b"\n")
    return digest.hexdigest()


def batch_order(num_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Example indices of every step: seeded permutations, one per epoch, cut into batches."""
    order: list[int] = []
    epoch = 0
    while len(order) < steps * batch_size:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order.extend(torch.randperm(num_examples, generator=generator).tolist())
        epoch += 1
    return [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


class LoraTrainer:
    """Finetunes LoRA adapters of one base: ``LoraTrainer(base).fit(records, out_dir)``."""

    def __init__(
        self, base: str | Path | BaseLM = DEFAULT_BASE, config: TrainConfig | None = None, progress=True
    ):
        self.base = resolve_base(base)
        self.config = config or TrainConfig()
        self.progress = progress
        self._tokenizer = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = self.base.load_tokenizer()
        return self._tokenizer

    def fit(
        self, records: Sequence[Record], out_dir: str | Path, data: dict | None = None, overwrite=False
    ) -> TrainingRun:
        """Train on ``records``, save the adapter + ``training.json`` at ``out_dir`` (atomically).

        ``data`` describes where the records came from (stored in ``training.json``). If
        ``out_dir`` already holds a run with the same base, data and config it is returned as is;
        an interrupted run resumes from its checkpoint (``.<name>.ckpt`` next to ``out_dir``).
        """
        cfg = self.config
        out_dir = Path(out_dir)
        records = self._subset(records)
        data = {**(data or {}), "records_sha256": records_hash(records), "num_records": len(records)}
        if (out_dir / TRAINING_FILE).exists():
            previous = TrainingRun.read(out_dir)
            same = (previous.config, previous.data.get("records_sha256"), previous.base_fingerprint) == (
                cfg,
                data["records_sha256"],
                self.base.fingerprint.id,
            )
            if same:
                logger.info("%s: already trained with this data and config, reusing it", out_dir)
                return previous
            if not overwrite:
                raise OutputExistsError(
                    f"{out_dir} holds an adapter trained with other data or settings: "
                    "choose another --out or pass overwrite=True / --force"
                )
        else:
            refuse_existing(out_dir, overwrite)  # a directory this trainer did not write
        if len(records) == 0:
            raise DeltaRouterError("no training records")

        sequences = [
            encode(
                self.tokenizer,
                r.formatted(cfg.prompt_format, self.tokenizer),
                r.output,
                cfg.max_length,
                eos=True,
            )
            for r in records
        ]
        steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(records) / cfg.batch_size))
        schedule = batch_order(len(records), cfg.batch_size, steps, cfg.seed)
        model, optimizer, scheduler = self._setup(steps)
        prefix = self._frozen_prefix(model, sequences, steps)
        checkpoint = out_dir.with_name(f".{out_dir.name}.ckpt")
        state = self._resume(checkpoint, model, optimizer, scheduler, data["records_sha256"])
        losses: list[float] = state["losses"]
        started = time.perf_counter() - state["wall_time_s"]

        bar = tqdm(total=steps, initial=len(losses), desc="train", disable=not self.progress)
        model.train()
        for step in range(len(losses), steps):
            loss = self._step(model, [sequences[i] for i in schedule[step]], prefix)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                self._checkpoint(checkpoint, model, optimizer, scheduler, data, losses, started)
        bar.close()

        run = TrainingRun(
            adapter_dir=out_dir,
            base=self.base.name,
            base_fingerprint=self.base.fingerprint.id,
            config=cfg,
            data=data,
            steps=steps,
            examples_seen=steps * cfg.batch_size,
            final_loss=_tail_mean(losses),
            losses=losses,
            wall_time_s=round(time.perf_counter() - started, 2),
            versions=package_versions(),
        )
        # force only if asked: a run that another process wrote meanwhile is not replaced
        with atomic_directory(out_dir, force=overwrite) as tmp:
            model.save_pretrained(str(tmp))
            if cfg.method == "full":
                self.tokenizer.save_pretrained(str(tmp))
            atomic_write_text(tmp / TRAINING_FILE, json.dumps(run.to_dict(), indent=2))
        checkpoint.unlink(missing_ok=True)
        logger.info("trained %s: %d steps, final loss %.4f", out_dir, steps, run.final_loss)
        return run

    # ---- pieces of fit -----------------------------------------------------------------------
    def _subset(self, records: Sequence[Record]) -> list[Record]:
        records = list(records)
        n = self.config.num_examples
        if n is None or n >= len(records):
            return records
        generator = torch.Generator().manual_seed(self.config.seed)
        keep = sorted(torch.randperm(len(records), generator=generator)[:n].tolist())
        return [records[i] for i in keep]

    def _setup(self, steps: int):
        from transformers import get_cosine_schedule_with_warmup

        cfg = self.config
        torch.manual_seed(cfg.seed)  # LoRA A's initialisation
        model = self._full_model() if cfg.method == "full" else self._lora_model()
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate, weight_decay=0.0
        )
        scheduler = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, steps - 1), steps)
        return model, optimizer, scheduler

    def _lora_model(self):
        from peft import LoraConfig, get_peft_model

        cfg = self.config
        model = self.base.load_model()
        layers = None
        if cfg.lora_layers is not None:
            depth = model.config.num_hidden_layers
            if not 1 <= cfg.lora_layers <= depth:
                raise DeltaRouterError(f"lora_layers={cfg.lora_layers}: the base has {depth} blocks")
            layers = list(range(depth - cfg.lora_layers, depth))
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.targets),
            layers_to_transform=layers,
            use_rslora=cfg.use_rslora,
            use_dora=cfg.use_dora,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, lora)

    def _full_model(self):
        """The base with only its last ``unfreeze_last`` blocks and final norm trainable."""
        cfg = self.config
        if cfg.method != "full" or not cfg.unfreeze_last >= 1:
            raise DeltaRouterError(f"method {cfg.method!r} with unfreeze_last={cfg.unfreeze_last}")
        model = self.base.load_model()
        model.requires_grad_(False)
        inner = model.get_decoder()
        for block in inner.layers[-cfg.unfreeze_last :]:
            block.requires_grad_(True)
        inner.norm.requires_grad_(True)
        return model

    def _frozen_prefix(self, model, sequences: list[TokenSequence], steps: int) -> FrozenPrefix | None:
        """What the frozen blocks make of each sequence, when only the last blocks train (a LoRA of
        ``lora_layers`` blocks, a full finetune of ``unfreeze_last``) and sequences are seen again."""
        cfg = self.config
        trained = cfg.unfreeze_last if cfg.method == "full" else cfg.lora_layers
        depth = self.base.config["num_hidden_layers"]
        if not trained or trained >= depth:
            return None
        if not FrozenPrefix.worth(sequences, steps * cfg.batch_size, self.base.config["hidden_size"]):
            return None
        pad_id = self.tokenizer.pad_token_id
        return FrozenPrefix(model, sequences, depth - trained, pad_id, cfg.micro_batch_size)

    def _step(self, model, sequences: list[TokenSequence], prefix: FrozenPrefix | None = None) -> float:
        """One optimizer step's gradients: mean loss over every answer token of the batch."""
        n_tokens = sum(s.n_continuation for s in sequences)
        sequences = sorted(sequences, key=lambda s: len(s.ids))  # less padding per micro-batch
        total, size = 0.0, self.config.micro_batch_size
        for start in range(0, len(sequences), size):
            chunk = sequences[start : start + size]
            if prefix is None:
                logprobs = answer_logprobs(model, collate(chunk, self.tokenizer.pad_token_id))[0]
            else:
                logprobs = prefix.answer_logprobs(model, chunk)[0]
            loss = -logprobs.sum() / n_tokens
            loss.backward()
            total += loss.item()
        return total

    def _checkpoint(self, path: Path, model, optimizer, scheduler, data: dict, losses, started) -> None:
        state = {
            "adapter": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "config": self.config.to_dict(),
            "records_sha256": data["records_sha256"],
            "losses": list(losses),
            "wall_time_s": time.perf_counter() - started,
        }
        tmp = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)  # the run's directory is written only at the end
        torch.save(state, tmp)
        os.replace(tmp, path)

    def _resume(self, path: Path, model, optimizer, scheduler, data_hash: str) -> dict:
        fresh = {"losses": [], "wall_time_s": 0.0}
        if not path.exists():
            return fresh
        state = torch.load(path, weights_only=False)
        if state["config"] != self.config.to_dict() or state["records_sha256"] != data_hash:
            logger.warning("%s: checkpoint of other data or settings, starting over", path)
            return fresh
        unexpected = model.load_state_dict(state["adapter"], strict=False).unexpected_keys  # trainable only
        if unexpected:
            logger.warning("%s: checkpoint of another model (%s), starting over", path, unexpected[0])
            return fresh
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        logger.info("%s: resuming at step %d", path, len(state["losses"]))
        return state


def _tail_mean(losses: list[float]) -> float:
    """Mean loss of the last quarter of the steps (at least one step)."""
    tail = losses[-max(1, len(losses) // 4) :]
    return sum(tail) / len(tail)
