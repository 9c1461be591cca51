"""The paper's analyses rerun on a built zoo; each writes ``<out>/<name>.md`` (+ PNG) and returns its numbers.

``ABLATIONS`` (run by ``delta-router ablations`` / ``make ablations``):

1. ``clustering``: silhouette by domain of Delta Activations vs the paper's baselines: flattened
   LoRA weights, a salient-parameter mask (top 1% |w| of the flattened LoRA factors), and output
   embeddings (the base's mean-pooled hidden state of each finetune's greedy answers to the probes).
2. ``probes``: number of probes (1, 3, 5, 20), the templates vs random words / in-domain text,
   layer (first, middle, last), last-token vs mean pooling.
3. ``robustness``: where finetunes with other rank / lr / data size land.
4. ``additivity``: cos(delta(mix of A and B), delta(A) + delta(B)) vs pairs not involved.
5. ``fewshot``: top-1 / top-3 domain retrieval vs the number of examples, both selection methods.
6. ``nuisance``: does the embedding group by how a finetune was made rather than by its domain?
   Silhouette and nearest-neighbour agreement by each recipe tag (prompt format, method, rank,
   target modules, seed; dataset within each domain) next to the same figures by domain.
7. ``task_format``: does a task's embedding follow its answer format or its content? 20 examples of
   each multiple-choice domain embedded as they are, with the answer as its option letter, and
   without the lettered options; top-1 / top-3 domain retrieval of each, plain and with the
   zoo-wide common component removed (index and query vectors centred on the index mean); and by
   the ``"queries"`` method (what the examples ask), with profiles from the finetunes' training
   prompts and data-free ones (each domain's profiles mapped by a map fitted without that domain).

Embeddings are cached by content hash and space, few-shot finetunes by examples, so reruns are fast.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from delta_router.data.templates import PAPER_PREAMBLES, alpaca_prompt
from delta_router.embedding.embedder import DeltaEmbedder
from delta_router.embedding.probes import PAPER_INPUT, ProbeSet
from delta_router.evaluation.clustering import (
    cosine_similarities,
    nearest_neighbours,
    save_figure,
    silhouette,
    tsne_plot,
)
from delta_router.home import atomic_write_text
from delta_router.models.finetunes import ADAPTER_WEIGHTS, Finetune
from delta_router.routing.data_free import (
    DEFAULT_PROFILE_DELTAS,
    centred_profiles,
    delta_blocks,
    leave_one_group_out,
    reference_pairs,
)
from delta_router.routing.router import QueryEncoder, Router
from delta_router.search.selector import SELECTION_METHODS, TaskSelector

logger = logging.getLogger(__name__)

PAPER = {
    "clustering": "silhouette: Delta Activations 0.614, weights -0.043, salient mask 0.190, outputs 0.087",
    "additivity": "0.73 (mixture vs sum of its parts)",
    "selection": "+2.0 points over random selection",
}
NUISANCE_FACTORS = ("format", "method", "rank", "targets", "seed", "dataset")
GENERIC_TASKS = (
    "Please provide a response.",
    "Respond to the request.",
    "Complete the task.",
    "Answer the query.",
)


class Ablations:
    """Runs the analyses on ``zoo`` (built) and writes reports to ``out_dir``."""

    def __init__(
        self,
        zoo,
        out_dir: str | Path,
        fewshot_sizes=(5, 10, 20, 50),
        fewshot_queries: int = 1,
        fewshot_formats: Sequence[str] = ("alpaca",),
        fewshot_methods: Sequence[str] = SELECTION_METHODS,
        probe_variants: Sequence[str] | None = None,
    ):
        """``fewshot_formats``: the prompt formats the few-shot queries' examples are given in;
        ``probe_variants``: run only these variants of the ``probes`` ablation (all by default)."""
        self.zoo, self.out_dir = zoo, Path(out_dir)
        self.fewshot_sizes, self.fewshot_queries = fewshot_sizes, fewshot_queries
        self.fewshot_formats, self.fewshot_methods = tuple(fewshot_formats), tuple(fewshot_methods)
        self.probe_variants = probe_variants
        self.entries = zoo.load_index().list()
        self.domain_entries = [e for e in self.entries if e.tags.get("kind") == "domain"]
        self.labels = [e.tags["domain"] for e in self.domain_entries]
        self.paths = [e.embedding.path for e in self.domain_entries]
        self.ids = [e.model_id for e in self.domain_entries]
        if probe_variants:  # checked before any ablation runs
            known = list(self.probe_variant_table())
            unknown = set(probe_variants) - set(known)
            if unknown:
                raise ValueError(f"unknown probe variants {sorted(unknown)}; known: {known}")

    def run(self, names: Sequence[str] | None = None) -> dict[str, dict]:
        results = {}
        for name in names or ABLATIONS:
            clock = time.perf_counter()
            results[name] = ABLATIONS[name](self)
            results[name]["seconds"] = round(time.perf_counter() - clock, 1)
            logger.info("ablation %s done in %.0fs", name, results[name]["seconds"])
            self._write(name, results[name])
        return results

    # ---- 1. clustering vs baselines ------------------------------------------------------------
    def clustering(self) -> dict:
        weights, outputs = self._weight_and_output_views()
        weight_name = "flattened LoRA weights"
        if self._uniform_lora():  # the paper's baseline: the LoRA factors, flattened
            weights = np.stack([self._lora_vector(p) for p in self.paths])
        else:  # ranks, modules or kinds differ: the dense weight change, at fixed sampled coordinates
            weight_name = "flattened weight deltas (sampled)"
        threshold = np.quantile(np.abs(weights), 0.99, axis=1, keepdims=True)
        methods = {
            "Delta Activations": np.stack([e.embedding.vector for e in self.domain_entries]),
            weight_name: weights,
            "salient mask (top 1%)": (np.abs(weights) >= threshold).astype(np.float32),
            "output embeddings": outputs,
        }
        scores = {name: silhouette(vectors, self.labels) for name, vectors in methods.items()}
        for name, vectors in methods.items():
            slug = name.split(" ")[0].lower()
            tsne_plot(vectors, self.labels, self.out_dir / f"clustering-{slug}.png", f"{name} (t-SNE)")
        return {"silhouette": scores, "paper": PAPER["clustering"]}

    def _uniform_lora(self) -> bool:
        """All domain finetunes are LoRA adapters with the same factor shapes."""
        shapes = set()
        for path in self.paths:
            if Finetune.open(path).kind != "lora":
                return False
            with safe_open(str(Path(path) / ADAPTER_WEIGHTS), framework="pt") as fh:
                shapes.add(tuple((k, tuple(fh.get_slice(k).get_shape())) for k in sorted(fh.keys())))
        return len(shapes) == 1

    @staticmethod
    def _lora_vector(path: str) -> np.ndarray:
        with safe_open(str(Path(path) / ADAPTER_WEIGHTS), framework="pt") as fh:
            return torch.cat([fh.get_tensor(k).flatten().float() for k in sorted(fh.keys())]).numpy()

    def _weight_and_output_views(self, per_matrix: int = 1024, max_tokens: int = 32):
        """Two embeddings of every domain finetune, each loaded once as a full model:

        - its weight change ``W_f - W_base`` at ``per_matrix`` seeded coordinates of every 2-D weight
          of the decoder blocks, ``[N, n_matrices * per_matrix]`` (any LoRA variant, rank or full model);
        - its greedy answers to the probes (``max_tokens``), embedded by the base (mean pooling) and
          averaged over probes, ``[N, d]``.
        """
        from delta_router.evaluation.harness import load_for_eval
        from delta_router.routing.router import QueryEncoder

        base = self.zoo.base.load_model()
        tokenizer = self.zoo.base.load_tokenizer()
        rng = np.random.default_rng(0)
        coords = {
            name: tuple(torch.from_numpy(rng.integers(0, n, per_matrix)) for n in w.shape)
            for name, w in base.state_dict().items()
            if w.ndim == 2 and ".layers." in name
        }

        def sample(model) -> np.ndarray:
            state = model.state_dict()
            return torch.cat([state[name][rows, cols] for name, (rows, cols) in coords.items()]).numpy()

        base_sample = sample(base)
        probes = list(ProbeSet.paper().texts)
        weights, answers = [], []
        for path in self.paths:
            model, _ = load_for_eval(path, self.zoo.base)
            weights.append(sample(model) - base_sample)
            answers += greedy_answers(model, tokenizer, probes, max_tokens)
            del model
        encoder = QueryEncoder.for_model(base, tokenizer, pooling="mean")
        outputs = encoder([a if a.strip() else "(empty)" for a in answers]).numpy()
        return np.stack(weights), outputs.reshape(len(self.paths), len(probes), -1).mean(1)

    # ---- 2. probes, layer, pooling -------------------------------------------------------------
    def probe_variant_table(self) -> dict[str, dict]:
        """Each variant of the ``probes`` ablation: its name -> ``DeltaEmbedder`` options."""
        paper = ProbeSet.paper().texts
        rng = random.Random(0)
        words = " ".join(paper).split()
        generic = [alpaca_prompt(t, PAPER_INPUT, p) for t in GENERIC_TASKS for p in PAPER_PREAMBLES]
        in_domain = [self.zoo.splits(d).fewshot[0].prompt() for d in self.zoo.spec.domains][:5]
        variants: dict[str, dict] = {
            "1 probe": {"probes": paper[:1]},
            "3 probes": {"probes": paper[:3]},
            "5 probes (paper)": {"probes": paper},
            "20 probes": {"probes": generic},
            "5 random-word texts": {"probes": [" ".join(rng.choices(words, k=30)) for _ in range(5)]},
            "5 in-domain prompts": {"probes": in_domain},
        }
        n_layers = self.zoo.base.fingerprint.num_layers
        for label, layer in (("first", 1), ("middle", n_layers // 2)):
            variants[f"layer {layer} ({label})"] = {"probes": paper, "layer": layer}
        variants["mean pooling"] = {"probes": paper, "pooling": "mean"}
        variants["unit-norm shift per probe"] = {"probes": paper, "normalize": "probe"}
        formats = ProbeSet.formats(tokenizer=self.zoo.base.load_tokenizer())
        variants[f"{len(formats)} probes, the paper's in each prompt format"] = {"probes": formats}
        variants[f"{len(formats)} probes in each format, unit-norm per probe"] = {
            "probes": formats,
            "normalize": "probe",
        }
        return variants

    def probes(self) -> dict:
        variants = self.probe_variant_table()
        scores: dict[str, dict[str, float]] = {"silhouette": {}}
        by_format = [e.tags.get("format") for e in self.domain_entries]
        if None not in by_format and len(set(by_format)) > 1:  # also: grouping by how it was prompted
            scores["silhouette by format"] = {}
        for name, options in variants.items():
            if self.probe_variants is not None and name not in self.probe_variants:
                continue
            embedder = DeltaEmbedder(self.zoo.base, progress=False, **options)
            vectors = embedder.transform(self.paths)
            scores["silhouette"][name] = silhouette(vectors, self.labels)
            if "silhouette by format" in scores:
                scores["silhouette by format"][name] = silhouette(vectors, by_format)
            logger.info("probes %s: %s", name, {k: v[name] for k, v in scores.items()})
        return scores

    # ---- 3. robustness -------------------------------------------------------------------------
    def robustness(self) -> dict:
        variants = [e for e in self.entries if e.tags.get("kind") == "robustness"]
        if not variants:
            return {"note": "this zoo has no robustness variants"}
        domains = sorted(set(self.labels))
        vectors_of = {
            d: [e.embedding.vector for e in self.domain_entries if e.tags["domain"] == d] for d in domains
        }
        centroids = np.stack([np.mean(vectors_of[d], 0) for d in domains])
        rows = {}
        for entry in variants:
            sims = cosine_similarities(np.vstack([entry.embedding.vector, centroids]))[0, 1:]
            order = np.argsort(-sims)
            rows[entry.model_id] = {
                "own domain": entry.tags["domain"],
                "nearest centroid": domains[order[0]],
                "cosine": float(sims[order[0]]),
                "runner-up cosine": float(sims[order[1]]),
            }
        vectors = np.stack([e.embedding.vector for e in self.domain_entries + variants])
        labels = self.labels + [e.tags["domain"] for e in variants]
        without = silhouette(np.stack([e.embedding.vector for e in self.domain_entries]), self.labels)
        return {
            "variants": rows,
            "silhouette with variants": silhouette(vectors, labels),
            "silhouette without": without,
        }

    # ---- 4. additivity -------------------------------------------------------------------------
    def additivity(self) -> dict:
        by_id = {e.model_id: e.embedding.vector for e in self.entries}
        mixtures = [e for e in self.entries if e.tags.get("kind") == "mixture"]
        if not mixtures:
            return {"note": "this zoo has no mixtures"}
        domains = sorted(set(self.labels))
        rows = {}
        for mix in mixtures:
            a, b = mix.tags["domain"].split("+")
            part = mix.tags.get("part", "0")
            pairs = [(a, b), *itertools.combinations([d for d in domains if d not in (a, b)], 2)]
            sums = np.stack([by_id[f"{x}-{part}"] + by_id[f"{y}-{part}"] for x, y in pairs])
            cos = cosine_similarities(np.vstack([mix.embedding.vector, sums]))[0, 1:]
            rows[mix.model_id] = {"cos(mix, A+B)": float(cos[0])}
            if len(pairs) > 1:  # pairs of domains the mixture was not trained on
                rows[mix.model_id] |= {
                    "cos(mix, C+D) mean": float(cos[1:].mean()),
                    "cos(mix, C+D) max": float(cos[1:].max()),
                }
        return {"mixtures": rows, "paper": PAPER["additivity"]}

    # ---- 5. few-shot task embedding ------------------------------------------------------------
    def fewshot(self) -> dict:
        index = self.zoo.load_index().filtered(lambda e: e.tags.get("kind") == "domain")
        table: dict[str, dict[str, dict[str, float]]] = {}
        selectors = {}
        for method, fmt in itertools.product(self.fewshot_methods, self.fewshot_formats):
            if method != "queries":
                key = method if self.fewshot_formats == ("alpaca",) else f"{method}, {fmt} format"
                selectors[key] = TaskSelector(index, method=method, progress=False, prompt_format=fmt)
        if "queries" in self.fewshot_methods:  # reads no template: one row for every format
            selectors |= self._query_selectors(index, DeltaEmbedder.for_space(index.space, progress=False))
        for key, selector in selectors.items():
            table[key] = {}
            for size in self.fewshot_sizes:
                top1, top3 = [], []
                for domain in self.zoo.spec.domains:
                    pool = self.zoo.splits(domain).fewshot
                    for q in range(self.fewshot_queries):
                        examples = pool[q * size : (q + 1) * size]
                        if len(examples) < size:
                            continue
                        got = [h.entry.tags["domain"] for h in selector.select(examples, k=3).hits]
                        top1.append(got[0] == domain)
                        top3.append(domain in got)
                table[key][str(size)] = {"top1": float(np.mean(top1)), "top3": float(np.mean(top3)),
                                         "queries": len(top1)}  # fmt: skip
                logger.info("fewshot %s n=%d: %s", key, size, table[key][str(size)])
        if len(self.fewshot_sizes) > 1:
            self._line_plot(table, self.out_dir / "fewshot.png")
        return {"accuracy": table}

    # ---- 6. recipe factors vs domain -----------------------------------------------------------
    def nuisance(self) -> dict:
        vectors = np.stack([e.embedding.vector for e in self.domain_entries])
        rows = {"domain": _grouping(vectors, self.labels)}
        for factor in NUISANCE_FACTORS:
            labels = [e.tags.get(factor) for e in self.domain_entries]
            if None in labels:
                continue
            sizes = Counter(labels)
            if len(sizes) < 2 or max(sizes.values()) < 2:
                rows[factor] = {"note": f"{len(sizes)} values over {len(labels)} finetunes: no groups"}
                continue
            rows[factor] = _grouping(vectors, labels)
            if factor == "dataset":  # nested in the domain: compare datasets within each domain
                within = []
                for domain in sorted(set(self.labels)):
                    idx = [i for i, d in enumerate(self.labels) if d == domain]
                    if len(idx) > 2 and 1 < len({labels[i] for i in idx}) < len(idx):
                        within.append(silhouette(vectors[idx], [labels[i] for i in idx]))
                rows[factor]["silhouette within domains"] = float(np.mean(within)) if within else None
            if factor == "format":
                tsne_plot(
                    vectors,
                    labels,
                    self.out_dir / "nuisance-format.png",
                    "Delta Activations by prompt format",
                )
        return {"grouping": rows}

    # ---- 6. answer format vs content of a task -------------------------------------------------
    def task_format(self, size: int = 20, variants: Sequence[str] | None = None) -> dict:
        index = self.zoo.load_index().filtered(lambda e: e.tags.get("kind") == "domain")
        entries = index.list()
        vectors = np.stack([e.embedding.vector for e in entries])
        domains = [e.tags["domain"] for e in entries]
        common = vectors.mean(0)
        selector = TaskSelector(index, progress=False)
        by_queries = self._query_selectors(index, selector.embedder)
        rows: dict[str, dict[str, list[bool]]] = {}

        def record(key: str, domain: str, top: list[str]) -> None:
            rows.setdefault(key, {"top1": [], "top3": []})
            rows[key]["top1"].append(top[0] == domain)
            rows[key]["top3"].append(domain in top)
            logger.info("task_format %s %s: %s", domain, key, top)

        for domain in self.zoo.spec.domains:
            examples = self.zoo.splits(domain).fewshot[:size]
            if examples[0].choices is None:
                continue  # free-form answers have no letter or options to take away
            for variant, records in format_variants(examples).items():
                if variants is not None and variant not in variants:
                    continue
                query = selector.select(records, k=3).query
                for centred in (False, True):
                    q, v = (query - common, vectors - common) if centred else (query, vectors)
                    order = np.argsort(-(v @ q) / (np.linalg.norm(v, axis=1) * np.linalg.norm(q)))
                    key = f"{variant}{', centred' if centred else ''}"
                    record(key, domain, [domains[i] for i in order[:3]])
                for name, by in by_queries.items():
                    hits = by.select(records, k=3).hits
                    record(f"{variant}, {name}", domain, [h.entry.tags["domain"] for h in hits])
        table = {key: {**{m: float(np.mean(hits)) for m, hits in r.items()}, "tasks": len(r["top1"])}
                 for key, r in rows.items()}  # fmt: skip
        return {"retrieval": table, "examples": size}

    def _query_selectors(self, index, embedder: DeltaEmbedder) -> dict[str, TaskSelector]:
        """The ``"queries"`` method over the zoo's domain finetunes, with profiles from their training
        prompts and data-free ones (from their profile deltas, each domain's map fitted without it)."""
        encoder = QueryEncoder.for_model(embedder.model, embedder.tokenizer)
        kind = DEFAULT_PROFILE_DELTAS
        deltas, trained = reference_pairs(self.zoo, encoder, kind)
        domains = [index.get(m).tags["domain"] for m in trained.model_ids]
        predicted = centred_profiles(
            leave_one_group_out(deltas, trained.profiles, domains, blocks=delta_blocks(kind))
        )
        free = Router(trained.model_ids, predicted, trained.center, trained.base_fingerprint)
        routers = {"by queries": trained, "by queries, data-free profiles": free}
        return {
            name: TaskSelector(index, "queries", embedder=embedder, router=router, progress=False)
            for name, router in routers.items()
        }

    def _line_plot(self, table: dict, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for method, per_size in table.items():
            sizes = [int(s) for s in per_size]
            ax.plot(sizes, [v["top1"] for v in per_size.values()], marker="o", label=f"{method} top-1")
            ax.plot(
                sizes, [v["top3"] for v in per_size.values()], marker="x", ls="--", label=f"{method} top-3"
            )
        ax.set_xscale("log")
        ax.set_xlabel("examples per task")
        ax.set_ylabel("domain retrieval accuracy")
        ax.legend(fontsize=7)
        save_figure(fig, path)

    # ---- output --------------------------------------------------------------------------------
    def _write(self, name: str, result: dict) -> None:
        body = json.dumps(result, indent=2)
        pngs = sorted(p.name for p in self.out_dir.glob(f"{name}*.png"))
        images = "".join(f"\n![{p}]({p})\n" for p in pngs)
        zoo = f"zoo `{self.zoo.spec.name}`: {len(self.ids)} single-domain finetunes"
        text = f"# Ablation: {name}\n\n{zoo}\n\n```json\n{body}\n```\n{images}"
        atomic_write_text(self.out_dir / f"{name}.md", text)
        atomic_write_text(self.out_dir / f"{name}.json", body)


ABLATIONS: dict[str, Callable[[Ablations], dict]] = {
    "clustering": Ablations.clustering,
    "probes": Ablations.probes,
    "robustness": Ablations.robustness,
    "additivity": Ablations.additivity,
    "fewshot": Ablations.fewshot,
    "nuisance": Ablations.nuisance,
    "task_format": Ablations.task_format,
}


def _grouping(vectors: np.ndarray, labels: Sequence[str]) -> dict:
    """Silhouette (cosine) by ``labels``, and how often a finetune's nearest neighbour shares its label
    (next to the chance rate of a random neighbour)."""
    neighbours = nearest_neighbours(vectors, [str(i) for i in range(len(labels))], labels)
    sizes = Counter(labels)
    n = len(labels)
    return {
        "silhouette": silhouette(vectors, labels),
        "groups": len(sizes),
        "nearest neighbour shares it": float(np.mean([nb.same_label for nb in neighbours])),
        "chance": float(sum(k * (k - 1) for k in sizes.values()) / (n * (n - 1))),
    }


def greedy_answers(model, tokenizer, prompts: Sequence[str], max_tokens: int) -> list[str]:
    """``model``'s greedy continuations of ``prompts`` (one left-padded batch), as text."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        batch = tokenizer(list(prompts), padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    with torch.inference_mode():
        out = model.generate(**batch, max_new_tokens=max_tokens, do_sample=False, temperature=None,
                             top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def format_variants(records) -> dict[str, list]:
    """Multiple-choice ``records`` as they are, answered by option letter, and without the options."""
    from dataclasses import replace

    letters = [replace(r, output=chr(ord("A") + r.answer)) for r in records]
    bare = [replace(r, input=r.input.split("\nA. ")[0]) for r in records]
    return {"as given": list(records), "letter answers": letters, "no options": bare}
