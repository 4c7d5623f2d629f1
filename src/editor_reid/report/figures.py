"""The report's matplotlib pictures, each returned as PNG bytes (Agg backend, nothing shown)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from editor_reid.errors import EditorReidError

__all__ = ["cmc_figure", "embedding_figure", "heat_map", "roc_figure", "training_figure", "png_bytes",
           "require_matplotlib", "tsne"]


class MissingExtraError(EditorReidError):
    exit_code = 1


_NEEDS = 'the report needs {}; install it with `pip install "editor-reid[report]"`'


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtraError(_NEEDS.format("matplotlib")) from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Fail early, before the evaluation, when the report extra is not installed."""
    _pyplot()
    try:
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(_NEEDS.format("scikit-learn (for the t-SNE embedding)")) from exc


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def cmc_figure(curves: Mapping[str, np.ndarray]) -> bytes:
    """CMC curves (label -> Rank-k fractions for k = 1..len) in percent."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for label, cmc in curves.items():
        ranks = np.arange(1, len(cmc) + 1)
        ax.plot(ranks, 100 * np.asarray(cmc), marker=".", markersize=3, label=label)
    ax.set_xlabel("rank k")
    ax.set_ylabel("matching rate (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return png_bytes(fig)


def training_figure(epochs: Sequence[Mapping], evals: Sequence[Mapping]) -> bytes:
    """Loss terms and learning rate per epoch (``epoch`` records of metrics.jsonl), and mAP /
    Rank-1 per evaluation (``eval`` records)."""
    plt = _pyplot()
    fig, (loss_ax, lr_ax, eval_ax) = plt.subplots(1, 3, figsize=(13, 3.4))
    x = [r["epoch"] for r in epochs]
    for key in sorted({k for r in epochs for k in r if k.startswith("loss_")}):
        loss_ax.plot(x, [r.get(key, np.nan) for r in epochs], marker=".", label=key[len("loss_"):])
    loss_ax.set_title("loss terms")
    loss_ax.set_xlabel("epoch")
    if epochs:
        loss_ax.legend(fontsize=7)
    lr_ax.plot(x, [r.get("lr", np.nan) for r in epochs], marker=".")
    lr_ax.set_title("learning rate")
    lr_ax.set_xlabel("epoch")
    ex = [r["epoch"] for r in evals]
    for key, label in (("mAP", "mAP"), ("rank1", "Rank-1")):
        eval_ax.plot(ex, [100 * r[key] for r in evals], marker="o", label=label)
    eval_ax.set_title("evaluation (%)")
    eval_ax.set_xlabel("epoch")
    if evals:
        eval_ax.legend(fontsize=8)
    for ax in (loss_ax, lr_ax, eval_ax):
        ax.grid(alpha=0.3)
    return png_bytes(fig)


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, marks: Mapping[float, float]) -> bytes:
    """The verification ROC (TPR against FPR, FPR on a log axis), with the ``marks`` {fpr: tpr}
    points labelled."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    positive = fpr > 0
    ax.plot(fpr[positive], 100 * tpr[positive], lw=1.5)
    for target, value in marks.items():
        if np.isfinite(value):
            ax.plot([target], [100 * value], "o", color="C3", markersize=4)
            ax.annotate(f"{100 * value:.1f}", (target, 100 * value), textcoords="offset points", xytext=(3, 4),
                        fontsize=7)
    lowest = fpr[positive].min() if positive.any() else 1e-4
    ax.set_xscale("log")
    ax.set_xlim(min(lowest, min(marks, default=1e-4)) / 2, 1.0)
    ax.set_ylim(0, 101)
    ax.set_xlabel("false-positive rate (pairs of different identities accepted)")
    ax.set_ylabel("true-positive rate (%)")
    ax.grid(alpha=0.3)
    return png_bytes(fig)


def tsne(features: np.ndarray, seed: int) -> np.ndarray:
    """[N, D] -> [N, 2] t-SNE (scikit-learn, PCA initialisation, seeded)."""
    from sklearn.manifold import TSNE

    n = len(features)
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(
        np.asarray(features, dtype=np.float32))


def embedding_figure(points: np.ndarray, labels: np.ndarray) -> bytes:
    """2-D points coloured by identity (20 colours, then the marker changes, so neighbouring
    identities rarely look alike)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    ids = np.unique(labels)
    markers = "os^Dv<>p"
    colours = plt.get_cmap("tab20").colors
    for k, pid in enumerate(ids):
        at = labels == pid
        ax.scatter(points[at, 0], points[at, 1], s=16, color=colours[k % 20], marker=markers[(k // 20) % len(markers)],
                   linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{len(points)} gallery features, {len(ids)} identities", fontsize=9)
    return png_bytes(fig)


def heat_map(values: np.ndarray, grid: tuple[int, int], size: tuple[int, int], under=None, alpha: float = 0.6):
    """A per-patch value map [gh * gw] as an RGB PIL image of ``size`` (W, H) in the inferno
    colour map, scaled to its own range, blended over the PIL image ``under`` when given."""
    from PIL import Image

    _pyplot()
    import matplotlib

    v = np.asarray(values, dtype=np.float64).reshape(grid)
    span = v.max() - v.min()
    v = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    rgb = (matplotlib.colormaps["inferno"](v)[..., :3] * 255).astype(np.uint8)
    image = Image.fromarray(rgb).resize(size, Image.NEAREST)
    if under is None:
        return image
    return Image.blend(under.convert("L").convert("RGB").resize(size), image, alpha)
