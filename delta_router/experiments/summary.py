"""One table of a zoo's headline figures next to another zoo's and the paper's (``README.md``).

Reads the JSON files that ``ablations`` (``clustering``, ``probes``, ``nuisance``, ``fewshot``) and
``benchmarks/route_accuracy.py --json`` (``routing``: accuracies, the silhouettes of each view of the
finetunes, abstention trades) write into a report directory; a figure that a
directory lacks is shown as "-".
"""

from __future__ import annotations

import json
from pathlib import Path

from delta_router.home import atomic_write_text

PAPER_SILHOUETTE = {"Delta Activations": 0.614, "weights": -0.043, "salient mask": 0.190, "outputs": 0.087}
_METHOD_ROWS = {  # clustering.json names -> row names shared by every zoo
    "Delta Activations": "Delta Activations",
    "flattened LoRA weights": "weights",
    "flattened weight deltas (sampled)": "weights",
    "salient mask (top 1%)": "salient mask",
    "output embeddings": "outputs",
}


def headline_figures(report_dir: str | Path) -> dict[str, str]:
    """Row name -> formatted figure, for every figure found under ``report_dir``."""
    report_dir = Path(report_dir)

    def read(name: str) -> dict:
        path = report_dir / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else {}

    rows: dict[str, str] = {}
    for method, value in read("clustering").get("silhouette", {}).items():
        rows[f"silhouette by domain: {_METHOD_ROWS.get(method, method)}"] = f"{value:.3f}"
    probes = read("probes")
    for measure, label in (
        ("silhouette", "silhouette by domain"),
        ("silhouette by format", "silhouette by format"),
    ):
        for variant, value in probes.get(measure, {}).items():
            rows[f"{label}, probes: {variant}"] = f"{value:.3f}"
    for factor, row in read("nuisance").get("grouping", {}).items():
        if "note" in row:
            rows[f"silhouette by {factor}"] = row["note"]
            continue
        rows[f"silhouette by {factor}"] = f"{row['silhouette']:.3f}"
        if row.get("silhouette within domains") is not None:
            rows[f"silhouette by {factor}, within each domain"] = f"{row['silhouette within domains']:.3f}"
        shares, chance = row["nearest neighbour shares it"], row["chance"]
        rows[f"nearest neighbour shares the {factor}"] = f"{shares:.0%} (chance {chance:.0%})"
    for method, per_size in read("fewshot").get("accuracy", {}).items():
        for size, cell in per_size.items():
            name = f"few-shot top-1 domain, {method}, {size} examples"
            rows[name] = f"{cell['top1']:.0%} of {cell['queries']}"
    routing = read("routing")
    for method, value in routing.get("accuracy", {}).items():
        rows[f"router accuracy: {method}"] = f"{value:.1%}"
    for view, by_factor in routing.get("silhouette", {}).items():
        for factor, value in by_factor.items():
            rows[f"silhouette by {factor}, view: {view}"] = f"{value:.3f}"
    for curve, result in routing.get("abstention", {}).items():
        best = result.get("best within 5 points")
        trade = f"{best['to_base']:.0%} for {best['lost']:.1f} points" if best else "none within 5 points"
        rows[f"withheld domain to the base, most within 5 points: {curve}"] = trade
    return rows


def _cross_zoo_names(rows: dict[str, str], own: str, other: str) -> dict[str, str]:
    """Rows of a zoo mapped by the other one (``map on full`` for wild, ``map on wild`` for full) under
    one name, so that the two zoos' figures share a row."""

    def shared(row: str) -> str:
        row = row.replace(f"map on {other} + {own}", "map on the other zoo + this zoo")
        return row.replace(f"map on {other}", "map on the other zoo")

    return {shared(row): value for row, value in rows.items()}


def write_summary(out_dir: str | Path, reference_dir: str | Path | None, names: tuple[str, str]) -> Path:
    """``out_dir/README.md``: the figures of ``out_dir`` next to ``reference_dir``'s and the paper's."""
    ours = _cross_zoo_names(headline_figures(out_dir), *names)
    theirs = _cross_zoo_names(headline_figures(reference_dir), *names[::-1]) if reference_dir else {}
    paper = {f"silhouette by domain: {k}": f"{v:.3f}" for k, v in PAPER_SILHOUETTE.items()}
    lines = [
        f"# Zoo `{names[0]}` next to `{names[1]}` and the paper",
        "",
        f"| measure | {names[0]} | {names[1]} | paper (8B models) |",
        "|---|---|---|---|",
    ]
    for row in [*ours, *(r for r in theirs if r not in ours)]:
        lines.append(f"| {row} | {ours.get(row, '-')} | {theirs.get(row, '-')} | {paper.get(row, '-')} |")
    pngs = sorted(p.name for p in Path(out_dir).glob("*.png"))
    lines += ["", *(f"![{p}]({p})" for p in pngs), ""]
    path = Path(out_dir) / "README.md"
    atomic_write_text(path, "\n".join(lines))
    return path
