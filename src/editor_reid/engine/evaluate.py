"""``editor-reid test``: evaluate a checkpoint (ours or the official release) on a dataset's test split,
with all modalities, missing ones, or across modalities (query and gallery fed different ones), or
evaluate a feature file without the model."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from editor_reid.config import Config, config_to_dict
from editor_reid.data.sources import load_configured
from editor_reid.data.validate import preflight
from editor_reid.engine import checkpoint as ckpt
from editor_reid.engine.acceleration import maybe_compile
from editor_reid.engine.checkpoint import CheckpointError
from editor_reid.engine.solver import autocast_context
from editor_reid.engine.inference import (
    METRIC_KEYS,
    FeatureCache,
    FeatureSet,
    build_eval_loaders,
    evaluate_features,
    summarize,
)
from editor_reid.engine.logging_utils import ensure_console_log
from editor_reid.engine.tables import format_metrics_table
from editor_reid.errors import UsageError
from editor_reid.features.store import FeatureFile, FeatureFileError, load_feature_file
from editor_reid.modalities import cross_modality_pairs, modality_subsets, pair_name, subset_name
from editor_reid.model import build_model, is_official_state_dict, load_official_checkpoint, official_model_sizes

__all__ = ["run_test", "evaluate_feature_file", "load_weights", "LoadedWeights", "model_for_checkpoint", "TestRun"]

log = logging.getLogger(__name__)


@dataclass
class LoadedWeights:
    kind: str  # "editor-reid" | "official" | "state_dict"
    path: str
    epoch: int | None = None
    metrics: dict | None = None
    config: dict | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class TestRun:
    """What :func:`run_test` had at hand after its evaluation, for a follow-up (``test --report``
    builds the HTML report from it without loading or extracting anything twice)."""

    cfg: Config
    weights: Path
    model: nn.Module  # in eval mode, on ``device``
    loaded: LoadedWeights
    splits: Any  # DatasetSplits with query and gallery
    features: FeatureCache  # the features extracted so far, and the way to extract more
    device: torch.device
    result: dict  # what run_test returns


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


Subset = tuple[str, ...]


def _modality_set(value: str | Sequence[str], configured: Sequence[str], side: str) -> Subset:
    """``"RGB,NI"`` or ``["RGB", "NI"]`` (any case) as a subset of the configured modalities, in
    their order, so that the same set always has the same name and features."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else map(str, value))]
    given = ",".join(names)
    choices = f"{', '.join(configured)} (datasets.modalities)"
    known = {m.lower(): m for m in configured}
    chosen: list[str] = []
    for name in names:
        if name.lower() not in known:
            what = "an empty name" if not name else f"'{name}'"
            raise UsageError(f"{side} modalities '{given}': {what} is not one of {choices}")
        if known[name.lower()] in chosen:
            raise UsageError(f"{side} modalities '{given}': '{name}' is named twice")
        chosen.append(known[name.lower()])
    if not chosen:
        raise UsageError(f"{side} modalities: none given; choose from {choices}")
    return tuple(m for m in configured if m in chosen)


def _row_plan(cfg: Config, missing: str | None, cross: str | None, query_modalities, gallery_modalities
              ) -> tuple[str, dict[str, tuple[Subset, Subset]]]:
    """What to evaluate: ``(kind, {row name: (query modalities, gallery modalities)})``; kind is
    "full", "missing", "cross" (the standard pairs, then the full-modality row) or "pair"."""
    if missing not in (None, "all"):
        raise ValueError(f"missing must be None or 'all', got {missing!r}")
    if cross not in (None, "all"):
        raise ValueError(f"cross must be None or 'all', got {cross!r}")
    pair = query_modalities is not None or gallery_modalities is not None
    if (missing is not None) + (cross is not None) + pair > 1:
        raise UsageError("missing='all', cross='all' and query/gallery modalities each choose the rows to "
                         "evaluate; give only one of them")
    inputs = tuple(cfg.datasets.modalities)
    if missing == "all":
        return "missing", {subset_name(s): (s, s) for s in modality_subsets(inputs)}
    if cross == "all":
        pairs = cross_modality_pairs(inputs)
        if not pairs:
            raise UsageError(f"the cross-modality evaluation needs two modalities or more; datasets.modalities "
                             f"is {list(inputs)}")
        return "cross", {**{pair_name(q, g): (q, g) for q, g in pairs}, subset_name(inputs): (inputs, inputs)}
    if pair:
        query = inputs if query_modalities is None else _modality_set(query_modalities, inputs, "query")
        gallery = inputs if gallery_modalities is None else _modality_set(gallery_modalities, inputs, "gallery")
        return "pair", {pair_name(query, gallery): (query, gallery)}
    return "full", {subset_name(inputs): (inputs, inputs)}


def _evaluate_rows(cfg: Config, features: FeatureCache, protocol: str, plan: Mapping[str, tuple[Subset, Subset]],
                   rerank: bool) -> dict[str, dict[str, float]]:
    """One metrics row per planned (query modalities, gallery modalities) pair. Each side's
    features for a modality subset are extracted once and shared by every row that uses them;
    where query and gallery are one sample list (RGBNT201), so are their features."""
    return {name: summarize(evaluate_features(cfg, features.get("query", q), features.get("gallery", g), protocol,
                                              rerank=rerank))
            for name, (q, g) in plan.items()}


def _table(rows: Mapping[str, Mapping[str, float]], kind: str) -> str:
    if kind != "cross":
        return format_metrics_table(rows, "query->gallery" if kind == "pair" else "modalities",
                                    rule_before=("average",))
    full = list(rows)[-1]
    notes = {"average": f"over the {len(rows) - 2} cross-modality pairs", full: "all modalities on both sides"}
    return format_metrics_table(rows, "query->gallery", notes=notes, rule_before=("average", full))


def _rerank_note(cfg: Config, rerank: bool) -> str:
    t = cfg.test
    return f", re-ranked (k1={t.rerank_k1}, k2={t.rerank_k2}, lambda={t.rerank_lambda:.2f})" if rerank else ""


def _print_report(cfg: Config, weights, loaded: LoadedWeights, splits, rows, kind: str,
                  plan: Mapping[str, tuple[Subset, Subset]], rerank: bool) -> None:
    origin = {"editor-reid": "editor-reid checkpoint", "official": "official EDITOR checkpoint",
              "state_dict": "state dict"}[loaded.kind]
    epoch = f", epoch {loaded.epoch}" if loaded.epoch is not None else ""
    print(f"weights: {weights} ({origin}{epoch})")
    for note in loaded.notes:
        print(f"  note: {note}")
    print(f"data: {splits.name} test split, {len(splits.query)} query / {len(splits.gallery)} gallery, "
          f"protocol {splits.protocol}{_rerank_note(cfg, rerank)}")
    if kind == "missing":
        print("missing modalities are fed as zero images (after normalisation)")
    elif kind == "cross":
        print("fed: the queries get only the modalities left of the arrow, the gallery only those right of it; "
              "absent modalities are zero images (after normalisation)")
    elif kind == "pair":
        ((query, gallery),) = plan.values()
        print(f"fed: queries {subset_name(query)}, gallery {subset_name(gallery)}; absent modalities are zero "
              "images (after normalisation)")
    print(_table(rows, kind))


def _write_json(json_out: str | Path | None, result: dict) -> None:
    if json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


def run_test(cfg: Config, weights: str | Path, *, rerank: bool = False, missing: str | None = None,
             cross: str | None = None, query_modalities: str | Sequence[str] | None = None,
             gallery_modalities: str | Sequence[str] | None = None, json_out: str | Path | None = None,
             device: str | None = None, quiet: bool = False, then: Callable[[TestRun], Any] | None = None,
             amp: str = "none") -> dict:
    """Evaluate ``weights`` on the test split of ``cfg.datasets.names`` and print a table.

    ``missing="all"`` evaluates every non-empty subset of the configured modalities (absent
    ones fed as zeros after normalisation) and adds their average. ``query_modalities`` /
    ``gallery_modalities`` (``"RGB"``, ``"NI,TI"`` or a list; the other side defaults to all
    configured modalities) feed each side only those modalities: cross-modality retrieval.
    ``cross="all"`` evaluates the standard pairs of
    :func:`~editor_reid.modalities.cross_modality_pairs`, their ``"average"`` and the
    full-modality row. Only one of ``missing``, ``cross`` and the query/gallery modalities may
    be given (UsageError otherwise, also for an unknown or unconfigured modality). ``rerank`` (or
    ``cfg.test.re_ranking``) applies k-reciprocal re-ranking with ``cfg.test.rerank_*``.
    Returns (and writes to ``json_out``) the metrics as fractions: ``{"mAP", "rank1", "rank5",
    "rank10", "mINP"}``, or with ``missing`` one such dict per subset plus ``"average"``, or with
    ``cross`` one per pair (``"RGB->NI"``), ``"average"`` (of the pairs) and ``"RGB+NI+TI"``.
    ``then`` is called last with the :class:`TestRun` (the report hooks in there). ``amp``
    ("none", "bf16", "fp16" on CUDA, "auto") runs the feature extraction under autocast.
    """
    kind, plan = _row_plan(cfg, missing, cross, query_modalities, gallery_modalities)
    ensure_console_log()
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autocast_context(dev, amp)  # an amp the device cannot run fails here, before anything is loaded
    state = ckpt.load_checkpoint(weights, map_location="cpu")
    # Only the evaluation split is needed: the checkpoint tells its identity and camera counts.
    splits = load_configured(cfg.datasets, splits=("query", "gallery"))
    preflight(splits, ("query", "gallery"), cfg.datasets.modalities)
    model = model_for_checkpoint(cfg, state, splits.num_train_pids, splits.num_cameras, weights)
    loaded = load_weights(model, weights, state)
    _check_config(loaded, cfg)
    _check_cameras(model, splits, weights)
    maybe_compile(model.to(dev).eval(), cfg)
    rerank = rerank or cfg.test.re_ranking
    features = FeatureCache(model, *build_eval_loaders(cfg, splits), dev, amp=amp, keep_token_masks=then is not None)
    rows = _evaluate_rows(cfg, features, splits.protocol, plan, rerank)
    if kind == "missing":
        rows["average"] = _average(list(rows.values()))
    elif kind == "cross":
        *pairs, full = rows  # the plan lists the full-modality row last
        rows = {**{n: rows[n] for n in pairs}, "average": _average([rows[n] for n in pairs]), full: rows[full]}
    result: dict = rows if kind in ("missing", "cross") else next(iter(rows.values()))
    if not quiet:
        _print_report(cfg, weights, loaded, splits, rows, kind, plan, rerank)
    _write_json(json_out, result)
    if then is not None:
        then(TestRun(cfg, Path(weights), model, loaded, splits, features, dev, result))
    return result


def _split_features(ff: FeatureFile, split: str, path: str | Path) -> FeatureSet:
    rows = ff.select(ff.split == split)
    if not len(rows):
        found = ", ".join(repr(str(s)) for s in np.unique(ff.split)) or "none"
        raise FeatureFileError(f"feature file '{path}' has no rows with 'split' == '{split}' (its splits: {found}); "
                               "test --features ranks the query rows against the gallery rows, as extract writes "
                               "them for a dataset's test split")
    if ff.protocol == "same_scene" and (rows.sceneid < 0).any():
        raise FeatureFileError(f"feature file '{path}': protocol same_scene needs the 'sceneid' of every query and "
                               f"gallery row, but {int((rows.sceneid < 0).sum())} {split} row(s) have -1")
    return FeatureSet(torch.from_numpy(rows.features), rows.pid, rows.camid, rows.sceneid)


def evaluate_feature_file(cfg: Config, path: str | Path, *, rerank: bool = False,
                          json_out: str | Path | None = None, quiet: bool = False) -> dict:
    """Evaluate a feature file (:mod:`editor_reid.features.store`) without the model: its rows
    with ``split == "query"`` against those with ``split == "gallery"``, under the file's
    ``protocol``; distance, ``feat_norm`` and re-ranking settings come from ``cfg.test``
    (``rerank`` or ``cfg.test.re_ranking``). Prints the table unless ``quiet``; returns (and
    writes to ``json_out``) the metrics as fractions, as :func:`run_test` does. A file without
    query or gallery rows, or with a malformed key, raises FeatureFileError naming the file."""
    ensure_console_log()
    ff = load_feature_file(path)
    query, gallery = _split_features(ff, "query", path), _split_features(ff, "gallery", path)
    rerank = rerank or cfg.test.re_ranking
    result = summarize(evaluate_features(cfg, query, gallery, ff.protocol, rerank=rerank))
    if not quiet:
        origin = f"from {ff.weights}" if ff.weights else "weights not recorded"
        print(f"features: {path} ({origin}; modalities fed {subset_name(ff.modalities)})")
        print(f"data: {len(query.pids)} query / {len(gallery.pids)} gallery rows, protocol {ff.protocol}"
              f"{_rerank_note(cfg, rerank)}")
        print(format_metrics_table({subset_name(ff.modalities): result}, "modalities"))
    _write_json(json_out, result)
    return result
