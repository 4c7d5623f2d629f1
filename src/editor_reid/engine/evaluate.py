"""``editor-reid test``: evaluate a checkpoint (ours or the official release) on a dataset's test split."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from editor_reid.config import Config, config_to_dict
from editor_reid.engine.inference import (
    METRIC_KEYS,
    build_eval_loaders,
    evaluate_features,
    extract_features,
    modality_subsets,
    subset_name,
    summarize,
)
from editor_reid.engine.logging_utils import ensure_console_log

__all__ = ["run_test", "load_weights", "LoadedWeights", "format_metrics_table", "is_official_state_dict"]

log = logging.getLogger(__name__)

# Top-level module names of the official EDITOR state dict (spec §8.2).
_OFFICIAL_PREFIXES = ("BACKBONE.", "FUSE_block.", "FUSE_HEAD.", "FUSE_BN.", "RGB_REDUCE.", "NIR_REDUCE.",
                      "TIR_REDUCE.", "BACKBONE_HEAD.", "BACKBONE_BN.", "AL_HEAD.", "AL_BN.", "FREQ_INDEX.")


@dataclass
class LoadedWeights:
    kind: str  # "editor-reid" | "official" | "state_dict"
    path: str
    epoch: int | None = None
    metrics: dict | None = None
    config: dict | None = None
    notes: list[str] = field(default_factory=list)


def _strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def is_official_state_dict(state: Any) -> bool:
    """True for a plain state dict in the official key layout (``BACKBONE.base.*``, ``FUSE_block.*``)."""
    if not isinstance(state, Mapping) or not state:
        return False
    keys = [k for k in _strip_module(state) if isinstance(k, str)]
    return any(k.startswith("BACKBONE.base.") for k in keys) or any(k.startswith("FUSE_block.") for k in keys)


def read_checkpoint(path: str | Path) -> Any:
    """Load a checkpoint with ``weights_only=True`` (no code execution from the file)."""
    from editor_reid.engine import checkpoint as ckpt

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return ckpt.load_checkpoint(path, map_location="cpu")


def _ours(state: Any) -> bool:
    from editor_reid.engine.train import STATE_FORMAT, WEIGHTS_FORMAT

    return isinstance(state, Mapping) and state.get("format") in (STATE_FORMAT, WEIGHTS_FORMAT)


def load_weights(model: nn.Module, path: str | Path, state: Any = None) -> LoadedWeights:
    """Load an editor-reid checkpoint (``last.pt``/``best.pt``/``epoch_n.pt``), an official
    EDITOR ``.pth`` or a plain state dict of our model into ``model``; the kind is told by the keys.
    """
    state = read_checkpoint(path) if state is None else state
    if _ours(state):
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise RuntimeError(
                f"checkpoint '{path}' does not fit the model built from this config; test it with the run's "
                f"config.yaml (next to checkpoints/): {exc}"
            ) from exc
        return LoadedWeights("editor-reid", str(path), epoch=state.get("epoch", state.get("progress", {}).get("epoch")),
                             metrics=state.get("metrics"), config=state.get("config"))
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"'{path}' is neither an editor-reid checkpoint nor a state dict of tensors")
    if is_official_state_dict(state):
        from editor_reid.model import load_official_checkpoint

        report = load_official_checkpoint(model, dict(state))
        notes = []
        ignored = getattr(report, "ignored_keys", None) or []
        missing = getattr(report, "missing_keys", None) or []
        if ignored:
            notes.append(f"{len(ignored)} checkpoint keys not used at test time (heads, BN necks, OCFR centres)")
        if missing:
            notes.append(f"{len(missing)} model keys absent from the checkpoint: {', '.join(missing[:5])}"
                         + (" ..." if len(missing) > 5 else ""))
        return LoadedWeights("official", str(path), notes=notes)
    try:
        model.load_state_dict(_strip_module(state))
    except RuntimeError as exc:
        raise RuntimeError(f"'{path}' is a state dict but matches neither this model nor the official layout: {exc}") from exc
    return LoadedWeights("state_dict", str(path))


def _official_sizes(state: Mapping[str, Any], num_classes: int, num_cameras: int) -> tuple[int, int]:
    """(num_classes, num_cameras) an official checkpoint was trained with, read from its shapes."""
    state = _strip_module(state)
    head = state.get("FUSE_HEAD.weight")
    if isinstance(head, torch.Tensor) and head.dim() == 2:
        num_classes = int(head.shape[0])
    sie = state.get("BACKBONE.base.sie_embed")
    if isinstance(sie, torch.Tensor) and sie.dim() == 3:
        num_cameras = int(sie.shape[0])
    return num_classes, num_cameras


def _pct(x: float) -> str:
    return f"{100 * x:6.2f}"


def format_metrics_table(rows: Mapping[str, Mapping[str, float]], first_column: str = "modalities") -> str:
    """A fixed-width table, metrics in percent."""
    width = max(len(first_column), *(len(name) for name in rows))
    head = f"{first_column:<{width}}  {'mAP':>6}  {'R-1':>6}  {'R-5':>6}  {'R-10':>6}  {'mINP':>6}"
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        if name == "average":
            lines.append("-" * len(head))
        lines.append(f"{name:<{width}}  " + "  ".join(_pct(m[k]) for k in METRIC_KEYS))
    return "\n".join(lines)


def _average(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(r[k] for r in rows) / len(rows) for k in METRIC_KEYS}


def _check_config(loaded: LoadedWeights, cfg: Config) -> None:
    if not loaded.config:
        return
    mine = config_to_dict(cfg)
    diffs = []
    for section in ("model", "input"):
        for key, value in loaded.config.get(section, {}).items():
            if mine[section].get(key) != value:
                diffs.append(f"{section}.{key} (checkpoint: {value!r}, config: {mine[section].get(key)!r})")
    if diffs:
        log.warning("the checkpoint was trained with a different config: %s", "; ".join(diffs))


def run_test(cfg: Config, weights: str | Path, *, rerank: bool = False, missing: str | None = None,
             json_out: str | Path | None = None, device: str | None = None, quiet: bool = False) -> dict:
    """Evaluate ``weights`` on the test split of ``cfg.datasets.names`` and print a table.

    ``missing="all"`` evaluates every non-empty subset of the configured modalities (absent
    ones fed as zeros after normalisation) and adds their average. ``rerank`` (or
    ``cfg.test.re_ranking``) applies k-reciprocal re-ranking with ``cfg.test.rerank_*``.
    Returns (and writes to ``json_out``) the metrics as fractions: ``{"mAP", "rank1", "rank5",
    "rank10", "mINP"}``, or with ``missing`` one such dict per subset plus ``"average"``.
    """
    from editor_reid.data.layouts import load_dataset
    from editor_reid.engine.acceleration import maybe_compile
    from editor_reid.model import build_model

    if missing not in (None, "all"):
        raise ValueError(f"missing must be None or 'all', got {missing!r}")
    ensure_console_log()
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = read_checkpoint(weights)
    splits = load_dataset(cfg.datasets.names, cfg.datasets.root_dir)
    num_classes, num_cameras = splits.num_train_pids, splits.num_cameras
    # The heads and the SIE table are sized by the training split; build the model the
    # checkpoint was made for (its heads are not used for retrieval).
    if _ours(state):
        num_classes = int(state.get("num_classes", num_classes))
        num_cameras = int(state.get("num_cameras", num_cameras))
    elif is_official_state_dict(state):
        num_classes, num_cameras = _official_sizes(state, num_classes, num_cameras)
    model = build_model(cfg, num_classes, num_cameras)
    loaded = load_weights(model, weights, state)
    _check_config(loaded, cfg)
    maybe_compile(model.to(dev).eval(), cfg)
    rerank = rerank or cfg.test.re_ranking

    query_loader, gallery_loader = build_eval_loaders(cfg, splits)
    inputs = tuple(cfg.datasets.modalities)
    subsets = modality_subsets(inputs) if missing == "all" else [inputs]
    rows: dict[str, dict[str, float]] = {}
    for subset in subsets:
        query = extract_features(model, query_loader, dev, modalities=subset, inputs=inputs)
        gallery = query if gallery_loader is None else extract_features(model, gallery_loader, dev,
                                                                         modalities=subset, inputs=inputs)
        rows[subset_name(subset)] = summarize(evaluate_features(cfg, query, gallery, splits.protocol, rerank=rerank))
    if missing == "all":
        rows["average"] = _average([rows[subset_name(s)] for s in subsets])
        result: dict = rows
    else:
        result = rows[subset_name(inputs)]

    if not quiet:
        origin = {"editor-reid": "editor-reid checkpoint", "official": "official EDITOR checkpoint",
                  "state_dict": "state dict"}[loaded.kind]
        epoch = f", epoch {loaded.epoch}" if loaded.epoch is not None else ""
        print(f"weights: {weights} ({origin}{epoch})")
        for note in loaded.notes:
            print(f"  note: {note}")
        print(f"data: {splits.name} test split, {len(splits.query)} query / {len(splits.gallery)} gallery, "
              f"protocol {splits.protocol}{', re-ranked (k1=%d, k2=%d, lambda=%.2f)' % (cfg.test.rerank_k1, cfg.test.rerank_k2, cfg.test.rerank_lambda) if rerank else ''}")
        if missing == "all":
            print("missing modalities are fed as zero images (after normalisation)")
        print(format_metrics_table(rows))
    if json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result
