"""How well embeddings group by a label (domain): silhouette, nearest neighbours, a t-SNE map.

Shared by ``zoo report`` and the ablations, so every embedding method is judged the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delta_router.embedding.vectors import unit_rows
from delta_router.home import atomic_write_bytes


def cosine_similarities(vectors: np.ndarray) -> np.ndarray:
    """[N, D] -> [N, N] cosine similarity matrix (float32): inner products of ``unit_rows``.

    The project's one normaliser, so these cosines are the ones the index and the router compute.
    """
    unit = unit_rows(vectors)
    return unit @ unit.T


def silhouette(vectors: np.ndarray, labels: Sequence[str]) -> float:
    """Mean silhouette score with cosine distance, in [-1, 1] (needs 2+ labels, 2+ items in one)."""
    from sklearn.metrics import silhouette_score

    return float(silhouette_score(np.asarray(vectors, dtype=np.float64), list(labels), metric="cosine"))


@dataclass(frozen=True)
class Neighbour:
    """The nearest other item to ``item`` by cosine similarity."""

    item: str
    label: str
    neighbour: str
    neighbour_label: str
    similarity: float

    @property
    def same_label(self) -> bool:
        return self.label == self.neighbour_label


def nearest_neighbours(vectors: np.ndarray, names: Sequence[str], labels: Sequence[str]) -> list[Neighbour]:
    """For each item, its most similar other item (leave-one-out 1-NN)."""
    sims = cosine_similarities(vectors)
    np.fill_diagonal(sims, -np.inf)
    best = sims.argmax(axis=1)
    return [
        Neighbour(names[i], labels[i], names[j], labels[j], float(sims[i, j])) for i, j in enumerate(best)
    ]


def tsne_plot(
    vectors: np.ndarray, labels: Sequence[str], path: str | Path, title: str, seed: int = 0, names=None
) -> Path:
    """Write a 2-D t-SNE map (cosine metric) coloured by label as a PNG; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    n = len(vectors)
    perplexity = float(max(2, min(30, (n - 1) // 3)))
    points = TSNE(2, perplexity=perplexity, metric="cosine", init="random", random_state=seed).fit_transform(
        np.asarray(vectors, dtype=np.float64)
    )
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=120)
    for k, label in enumerate(sorted(set(labels))):
        rows = [i for i, lab in enumerate(labels) if lab == label]
        ax.scatter(points[rows, 0], points[rows, 1], s=60, label=label, color=plt.cm.tab10(k % 10))
    for i, name in enumerate(names or []):
        ax.annotate(name, points[i], fontsize=6, alpha=0.7, xytext=(3, 3), textcoords="offset points")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Write a matplotlib figure as a PNG atomically (temp + rename) and close it."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
