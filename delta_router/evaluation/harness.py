"""lm-eval integration: task configs for held-out splits, and in-process evaluation of any model.

``write_tasks`` turns held-out records into lm-eval task YAMLs that read local JSONL (absolute
paths, offline), one per domain:

- multiple-choice records -> ``output_type: multiple_choice`` (``acc``, ``acc_norm``): the accuracy
  ``delta_router.evaluation.scoring`` computes (same prompt, same answer separator; its docstring
  says what differs and why both exist);
- free-form records -> ``loglikelihood`` of the reference answer, reported as ``loglik``: the mean
  over documents of the answer's summed log-probability (nats; lm-eval's ``perplexity`` would be
  its exp, which overflows past ~709 nats, i.e. a few hundred tokens), and, where the
  domain's final answer can be extracted (``ANSWER_PATTERNS``: GSM8K's "So the answer is N."), a
  generative ``<task>_gen`` scored by exact match on the extracted number. Generation is slow on a
  CPU: give it a ``limit``.

``LmEvaluator`` runs lm-eval's ``HFLM`` (on a CPU ``SharedContextHFLM``, which runs each
multiple-choice context once) over an already loaded model or ``PeftModel``, so the base, a single
adapter and a merged model are scored the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from delta_router.data import Record
from delta_router.data.sequences import ANSWER_SEPARATOR
from delta_router.errors import DataError
from delta_router.home import atomic_write_text, cache_dir, sha256_files
from delta_router.model_ids import BASE_MODEL_NAME
from delta_router.models.base import BaseLM
from delta_router.models.finetunes import Finetune, check_fits, fold_lora

logger = logging.getLogger(__name__)

TASK_PREFIX = "dr_"
ANSWER_PATTERNS = {"math": r"answer is\s*\$?(-?[\d,]*\.?\d+)"}
GENERATION_STOPS = ["\n\n", "###"]
METRIC_NAMES = {"perplexity": "loglik"}  # lm-eval's name -> ours (see write_tasks)


def task_name(domain: str) -> str:
    return TASK_PREFIX + re.sub(r"\W", "_", domain)


def write_tasks(held_out: Mapping[str, Sequence[Record]], out_dir: str | Path | None = None) -> Path:
    """Write ``<task>.jsonl`` + ``<task>.yaml`` per domain; returns the directory (lm-eval's include path).

    The default directory is keyed by the records' content, so a rerun reuses it.
    """
    rows = {domain: [_row(r, domain) for r in records] for domain, records in held_out.items()}
    if out_dir is None:
        digest = json.dumps(rows, sort_keys=True).encode()
        out_dir = cache_dir("evals", "tasks", hashlib.sha256(digest).hexdigest()[:16])
    out_dir = Path(out_dir)
    datasets_cache = cache_dir("evals", "hf-datasets")
    for domain, domain_rows in rows.items():
        if not domain_rows:
            raise DataError(f"no held-out records for {domain!r}")
        name = task_name(domain)
        data = out_dir / f"{name}.jsonl"
        atomic_write_text(data, "".join(json.dumps(row) + "\n" for row in domain_rows))
        common = {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(datasets_cache)},
            "test_split": "test",
            "doc_to_text": "{{prompt}}",
            "target_delimiter": ANSWER_SEPARATOR,
            "metadata": {"version": 1, "data_sha256": sha256_files([data])},
        }
        mean = {"aggregation": "mean", "higher_is_better": True}
        if all("choices" in row for row in domain_rows):
            config = common | {
                "task": name,
                "output_type": "multiple_choice",
                "doc_to_choice": "{{choices}}",
                "doc_to_target": "answer",
                "metric_list": [{"metric": "acc"} | mean, {"metric": "acc_norm"} | mean],
            }
            _write_yaml(out_dir / f"{name}.yaml", config)
            continue
        _write_yaml(
            out_dir / f"{name}.yaml",
            common | {"task": name, "output_type": "loglikelihood", "doc_to_target": "{{output}}",
                      # lm-eval's per-document log-likelihood is named "perplexity": averaged, not exp'd
                      "metric_list": [{"metric": "perplexity", "aggregation": "mean",
                                       "higher_is_better": True}]},
        )  # fmt: skip
        if all("final_answer" in row for row in domain_rows):
            _write_yaml(
                out_dir / f"{name}_gen.yaml",
                common | {
                    "task": f"{name}_gen", "output_type": "generate_until",
                    "doc_to_target": "{{final_answer}}",
                    "generation_kwargs": {"until": GENERATION_STOPS, "max_gen_toks": 160, "do_sample": False},
                    "filter_list": [{"name": "final", "filter": [
                        {"function": "regex", "regex_pattern": ANSWER_PATTERNS[domain], "group_select": -1},
                        {"function": "take_first"}]}],
                    "metric_list": [{"metric": "exact_match", "ignore_punctuation": True} | mean],
                },
            )  # fmt: skip
    return out_dir


def _row(record: Record, domain: str) -> dict:
    row = {"prompt": record.prompt(), "output": record.output}
    if record.choices is not None:
        row |= {"choices": list(record.choices), "answer": record.answer}
    elif domain in ANSWER_PATTERNS:
        found = re.findall(ANSWER_PATTERNS[domain], record.output)
        if found:
            row["final_answer"] = found[-1]
    return row


def _write_yaml(path: Path, config: dict) -> None:
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False, allow_unicode=True))


class LmEvaluator:
    """Scores loaded models on the tasks of one include path: ``evaluate(model, tokenizer, tasks)``.

    ``limit`` caps the documents per task (``None`` = all); results are ``{task: {metric: value}}``.
    ``shared_context``: score each multiple-choice context once (``SharedContextHFLM``), or with
    lm-eval's plain ``HFLM`` (one pass per choice); default: shared on a CPU, where it is ~1.8x
    faster, plain on a GPU, where HFLM's large batches win (benchmarks/RESULTS.md).
    """

    def __init__(
        self,
        tasks_dir: str | Path,
        batch_size: int = 16,
        limit: int | None = None,
        shared_context: bool | None = None,
    ):
        from lm_eval.tasks import TaskManager

        self.tasks_dir, self.batch_size, self.limit = Path(tasks_dir), batch_size, limit
        self.shared_context = shared_context
        self.manager = TaskManager(include_path=str(self.tasks_dir), include_defaults=False)

    @property
    def tasks(self) -> list[str]:
        return sorted(p.stem for p in self.tasks_dir.glob(f"{TASK_PREFIX}*.yaml"))

    def evaluate(self, model, tokenizer, tasks: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        results = {}
        for task, metrics in self.run(model, tokenizer, tasks)["results"].items():
            results[task] = {
                _metric_name(key): float(value)
                for key, value in metrics.items()
                if "," in key and "_stderr" not in key and isinstance(value, (int, float))
            }
        return results

    def run(self, model, tokenizer, tasks: Sequence[str] | None = None, log_samples: bool = False) -> dict:
        """lm-eval's own output (``simple_evaluate``); ``log_samples`` adds each document's responses."""
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        from delta_router.evaluation.shared_context import SharedContextHFLM

        tasks = list(tasks or self.tasks)
        unknown = sorted(set(tasks) - set(self.tasks))
        if unknown:
            raise DataError(f"unknown eval tasks {unknown}; available: {', '.join(self.tasks)}")
        device = next(model.parameters()).device
        shared = self.shared_context if self.shared_context is not None else device.type == "cpu"
        lm_class = SharedContextHFLM if shared else HFLM
        lm = lm_class(pretrained=model, tokenizer=tokenizer, device=str(device), batch_size=self.batch_size)
        return simple_evaluate(
            model=lm, tasks=tasks, task_manager=self.manager, limit=self.limit, log_samples=log_samples,
            bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
        )  # fmt: skip


def _metric_name(key: str) -> str:
    """lm-eval's result key ("acc,none") -> our metric name ("acc")."""
    name = key.split(",")[0]
    return METRIC_NAMES.get(name, name)


def load_for_eval(model: str | Path, base: BaseLM):
    """``BASE_MODEL_NAME`` (``"base"``), a LoRA adapter directory or a full model directory -> (model,
    tokenizer), fp32 eval."""
    tokenizer = base.load_tokenizer()
    if str(model) == BASE_MODEL_NAME:
        return base.load_model(), tokenizer
    finetune = Finetune.open(model)
    check_fits(finetune, base)
    if finetune.kind == "lora":
        # Folding the adapter into the weights scores the same model without LoRA's extra matmuls.
        return fold_lora(base.load_model(), finetune.path), tokenizer
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(finetune.path), dtype="float32").eval(), tokenizer
