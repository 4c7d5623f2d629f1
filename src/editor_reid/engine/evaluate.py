"""``editor-reid test``: evaluate a checkpoint (ours or the official release) on a dataset's test split."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from editor_reid.config import Config, config_to_dict
from editor_reid.data.layouts import load_dataset
from editor_reid.data.validate import preflight
from editor_reid.engine import checkpoint as ckpt
from editor_reid.engine.acceleration import maybe_compile
from editor_reid.engine.checkpoint import CheckpointError
from editor_reid.engine.inference import METRIC_KEYS, build_eval_loaders, evaluate_features, extract_features, summarize
from editor_reid.engine.logging_utils import ensure_console_log
from editor_reid.engine.tables import format_metrics_table
from editor_reid.modalities import modality_subsets, subset_name
from editor_reid.model import build_model, is_official_state_dict, load_official_checkpoint, official_model_sizes

__all__ = ["run_test", "load_weights", "LoadedWeights", "model_for_checkpoint"]

log = logging.getLogger(__name__)


@dataclass
class LoadedWeights:
    kind: str  # "editor-reid" | "official" | "state_dict"
    path: str
    epoch: int | None = None
    metrics: dict | None = None
    config: dict | None = None
    notes: list[str] = field(default_factory=list)


def _fit_error(path: str | Path, what: str, exc: RuntimeError) -> CheckpointError:
    """torch's load_state_dict message, first lines only: the full list of keys can run to hundreds."""
    lines = str(exc).strip().splitlines()
    detail = " ".join(line.strip() for line in lines[:3]) + (" ..." if len(lines) > 3 else "")
    return CheckpointError(f"checkpoint '{path}' {what}: {detail}")


def _load_ours(model: nn.Module, path: str | Path, state: Mapping[str, Any]) -> LoadedWeights:
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise _fit_error(path, "does not fit the model built from this config; test it with the run's config.yaml "
                               "(next to checkpoints/)", exc) from exc
    epoch = state.get("epoch", state.get("progress", {}).get("epoch"))  # weights file, or a training state
    return LoadedWeights("editor-reid", str(path), epoch=epoch, metrics=state.get("metrics"),
                         config=state.get("config"))


def _load_official(model: nn.Module, path: str | Path, state: Mapping[str, Any]) -> LoadedWeights:
    report = load_official_checkpoint(model, dict(state))
    notes = []
    if report.ignored_keys:
        notes.append(f"{len(report.ignored_keys)} checkpoint keys not used at test time (heads, BN necks, OCFR centres)")
    if report.missing_keys:
        missing = report.missing_keys
        notes.append(f"{len(missing)} model keys absent from the checkpoint: {', '.join(missing[:5])}"
                     + (" ..." if len(missing) > 5 else ""))
    return LoadedWeights("official", str(path), notes=notes)


def load_weights(model: nn.Module, path: str | Path, state: Any = None) -> LoadedWeights:
    """Load an editor-reid checkpoint (``last.pt``/``best.pt``/``epoch_n.pt``), an official
    EDITOR ``.pth`` or a plain state dict of our model into ``model``; the kind is told by the keys.
    ``state``: the file's contents when already read (the file is read with weights_only)."""
    state = ckpt.load_checkpoint(path, map_location="cpu") if state is None else state
    if ckpt.is_editor_reid_checkpoint(state):
        return _load_ours(model, path, state)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' is neither an editor-reid checkpoint nor a state dict of tensors")
    if is_official_state_dict(state):
        return _load_official(model, path, state)
    plain = dict(state)
    consume_prefix_in_state_dict_if_present(plain, "module.")
    try:
        model.load_state_dict(plain)
    except RuntimeError as exc:
        raise _fit_error(path, "is a state dict but matches neither this model nor the official layout", exc) from exc
    return LoadedWeights("state_dict", str(path))


def model_for_checkpoint(cfg: Config, state: Any, num_classes: int, num_cameras: int,
                         source: str | Path = "the checkpoint") -> nn.Module:
    """The model a checkpoint was made for: its heads and SIE table are sized by the training
    split it saw (the heads are not used for retrieval), which the file tells better than the
    dataset at hand; ``num_classes`` / ``num_cameras`` are used where it does not. ``source``
    names the file in errors."""
    classes = cameras = None
    if ckpt.is_editor_reid_checkpoint(state):
        classes, cameras = state.get("num_classes"), state.get("num_cameras")
    elif isinstance(state, Mapping) and is_official_state_dict(state):
        classes, cameras = official_model_sizes(state)
    elif isinstance(state, Mapping):  # a plain state dict of our model: its shapes tell
        classes, cameras = _leading_size(state, "fuse_head.weight", 2), _leading_size(state, "backbone.sie_embed", 3)
    num_classes = int(classes) if classes is not None else num_classes
    num_cameras = int(cameras) if cameras is not None else num_cameras
    if num_classes <= 0:
        raise CheckpointError(f"'{source}' does not say how many identities it was trained on (neither an "
                              "editor-reid checkpoint, nor an official one, nor a state dict with fuse_head.weight)")
    return build_model(cfg, num_classes, num_cameras)


def _leading_size(state: Mapping[str, Any], key: str, ndim: int) -> int | None:
    value = state.get(key, state.get(f"module.{key}"))
    return int(value.shape[0]) if isinstance(value, torch.Tensor) and value.dim() == ndim else None


def _check_cameras(model: nn.Module, splits, weights) -> None:
    """Camera ids beyond the model's SIE table would index it out of range mid-evaluation."""
    sie = model.backbone.sie_embed
    if sie is None:
        return
    camids = [s.camid for s in (*splits.query, *splits.gallery)]
    if camids and max(camids) >= sie.shape[0]:
        raise CheckpointError(
            f"checkpoint '{weights}' was trained with {sie.shape[0]} cameras (its SIE camera embedding), but the "
            f"{splits.name} test split has camera id {max(camids)} (camera {max(camids) + 1}); a checkpoint can be "
            "tested only on data whose cameras it has seen, e.g. the dataset it was trained on")


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


def _evaluate_subsets(cfg: Config, model: nn.Module, splits, device: torch.device, missing: str | None,
                      rerank: bool) -> dict[str, dict[str, float]]:
    """One metrics row per evaluated modality subset (all modalities only, without ``missing``)."""
    query_loader, gallery_loader = build_eval_loaders(cfg, splits)
    inputs = tuple(cfg.datasets.modalities)
    rows: dict[str, dict[str, float]] = {}
    for subset in modality_subsets(inputs) if missing == "all" else [inputs]:
        query = extract_features(model, query_loader, device, modalities=subset)
        gallery = query if gallery_loader is None else extract_features(model, gallery_loader, device,
                                                                         modalities=subset)
        rows[subset_name(subset)] = summarize(evaluate_features(cfg, query, gallery, splits.protocol, rerank=rerank))
    return rows


def _print_report(cfg: Config, weights, loaded: LoadedWeights, splits, rows, missing, rerank: bool) -> None:
    origin = {"editor-reid": "editor-reid checkpoint", "official": "official EDITOR checkpoint",
              "state_dict": "state dict"}[loaded.kind]
    epoch = f", epoch {loaded.epoch}" if loaded.epoch is not None else ""
    print(f"weights: {weights} ({origin}{epoch})")
    for note in loaded.notes:
        print(f"  note: {note}")
    t = cfg.test
    reranked = f", re-ranked (k1={t.rerank_k1}, k2={t.rerank_k2}, lambda={t.rerank_lambda:.2f})" if rerank else ""
    print(f"data: {splits.name} test split, {len(splits.query)} query / {len(splits.gallery)} gallery, "
          f"protocol {splits.protocol}{reranked}")
    if missing == "all":
        print("missing modalities are fed as zero images (after normalisation)")
    print(format_metrics_table(rows, "modalities", rule_before=("average",)))


def run_test(cfg: Config, weights: str | Path, *, rerank: bool = False, missing: str | None = None,
             json_out: str | Path | None = None, device: str | None = None, quiet: bool = False) -> dict:
    """Evaluate ``weights`` on the test split of ``cfg.datasets.names`` and print a table.

    ``missing="all"`` evaluates every non-empty subset of the configured modalities (absent
    ones fed as zeros after normalisation) and adds their average. ``rerank`` (or
    ``cfg.test.re_ranking``) applies k-reciprocal re-ranking with ``cfg.test.rerank_*``.
    Returns (and writes to ``json_out``) the metrics as fractions: ``{"mAP", "rank1", "rank5",
    "rank10", "mINP"}``, or with ``missing`` one such dict per subset plus ``"average"``.
    """
    if missing not in (None, "all"):
        raise ValueError(f"missing must be None or 'all', got {missing!r}")
    ensure_console_log()
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = ckpt.load_checkpoint(weights, map_location="cpu")
    # Only the evaluation split is needed: the checkpoint tells its identity and camera counts.
    splits = load_dataset(cfg.datasets.names, cfg.datasets.root_dir, splits=("query", "gallery"))
    preflight(splits, ("query", "gallery"), cfg.datasets.modalities)
    model = model_for_checkpoint(cfg, state, splits.num_train_pids, splits.num_cameras, weights)
    loaded = load_weights(model, weights, state)
    _check_config(loaded, cfg)
    _check_cameras(model, splits, weights)
    maybe_compile(model.to(dev).eval(), cfg)
    rerank = rerank or cfg.test.re_ranking
    rows = _evaluate_subsets(cfg, model, splits, dev, missing, rerank)
    if missing == "all":
        rows["average"] = _average(list(rows.values()))
        result: dict = rows
    else:
        (result,) = rows.values()
    if not quiet:
        _print_report(cfg, weights, loaded, splits, rows, missing, rerank)
    if json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result
