"""The report's matplotlib pictures, each returned as PNG bytes (Agg backend, nothing shown)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np

from editor_reid.errors import EditorReidError

__all__ = ["cmc_figure", "training_figure", "png_bytes", "require_matplotlib"]


class MissingExtraError(EditorReidError):
    exit_code = 1


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise MissingExtraError('the report needs matplotlib; install it with `pip install "editor-reid[report]"`') \
            from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def require_matplotlib() -> None:
    """Fail early, before the evaluation, when the report extra is not installed."""
    _pyplot()


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
