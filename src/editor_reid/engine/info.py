"""``editor-reid info``: build the model of a preset and count its parameters as the paper does."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from editor_reid.data.layouts import KNOWN_TRAIN_STATS, MANIFEST
from editor_reid.data.sources import load_configured
from editor_reid.model import build_model, count_parameters

__all__ = ["describe", "train_statistics"]


def train_statistics(cfg, root: str | Path | None = None) -> tuple[int, int, str]:
    """(train IDs, camera count, source) from the configured manifest, the dataset at ``root`` or
    the known statistics."""
    name = cfg.datasets.names
    if name == MANIFEST:
        splits = load_configured(cfg.datasets)
        return splits.num_train_pids, splits.num_cameras, f"manifest {cfg.datasets.manifest}"
    if root is not None:
        splits = load_configured(dataclasses.replace(cfg.datasets, root_dir=str(root)))
        return splits.num_train_pids, splits.num_cameras, f"dataset at {root}"
    if name not in KNOWN_TRAIN_STATS:
        raise ValueError(f"no known statistics for dataset '{name}'; pass --root")
    ids, cams = KNOWN_TRAIN_STATS[name]
    return ids, cams, "known statistics"


def describe(cfg, root: str | Path | None = None) -> str:
    """Summary of the model built for ``cfg``: sizes, switches and the paper-style parameter count
    (trainable parameters including the unused backbone ``fc``, excluding the OCFR centres)."""
    num_classes, num_cameras, source = train_statistics(cfg, root)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = build_model(cfg, num_classes, num_cameras)
    backbone = model.backbone
    fc = count_parameters(backbone.fc)
    vit = count_parameters(backbone) - fc
    hma_blocks = count_parameters(model.hma) - (count_parameters(model.hma.reduce) if model.hma is not None else 0)
    reduce = count_parameters(model.hma.reduce) if model.hma is not None else 0
    necks = (model.fuse_bn, model.fuse_head, model.backbone_bn, model.backbone_head, model.al_bn, model.al_head)
    heads = sum(count_parameters(m) for m in necks)
    total = count_parameters(model)
    centres = 3 * num_classes * model.embed_dim if (model.hma is not None and cfg.model.ocfr) else 0
    h, w = cfg.input.size_train
    rows, cols = backbone.grid_size
    m = cfg.model
    setting = "A (AL head on the concatenated backbone CLS)" if m.al == 1 else "B (shared per-modality backbone head)"
    lines = [
        f"EDITOR for {cfg.datasets.names}: {num_classes} train IDs, {num_cameras} cameras ({source})",
        f"  backbone   {m.transformer_type}: width {backbone.embed_dim}, depth {backbone.depth}, heads {backbone.num_heads}; "
        f"input {h}x{w} -> {rows}x{cols} = {backbone.num_patches} patches; "
        f"SIE {'on (x%.1f, %d cameras)' % (m.sie_coe, num_cameras) if backbone.sie_embed is not None else 'off'}",
        f"  SFTS       {'on' if m.sfts else 'off (all tokens kept)'}: head_keep {m.head_keep}, frequency_keep {m.frequency_keep}, "
        f"frequency_mode {m.frequency_mode}",
        f"  HMA        {'on' if m.hma else 'off (feature = concatenated backbone CLS)'}; setting {setting}",
        f"  feature    {model.feat_dim}-d (pre-BN f_HMA)",
        f"Parameters: {total / 1e6:.2f} M (paper counting: trainable, incl. the unused backbone fc, excl. OCFR centres)",
        f"  backbone ViT + SIE       {vit / 1e6:8.2f} M",
        f"  backbone fc (unused)     {fc / 1e6:8.2f} M",
        f"  HMA blocks + out_norm    {hma_blocks / 1e6:8.2f} M",
        f"  REDUCE                   {reduce / 1e6:8.2f} M",
        f"  heads + BN               {heads / 1e6:8.2f} M",
        f"  (OCFR centres, in the loss, not counted: {centres / 1e6:.3f} M)",
    ]
    return "\n".join(lines)
