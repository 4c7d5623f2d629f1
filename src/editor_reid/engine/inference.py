"""Feature extraction and the query/gallery evaluation shared by training, ``test`` and the demo."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from editor_reid import metrics
from editor_reid.config import Config
from editor_reid.data.loaders import SAMPLE_KEYS, build_test_loader
from editor_reid.engine.distributed import unwrap_model
from editor_reid.engine.solver import autocast_context

__all__ = [
    "FeatureCache",
    "FeatureSet",
    "extract_features",
    "evaluate_features",
    "evaluate_model",
    "batch_images",
    "build_eval_loaders",
    "summarize",
    "METRIC_KEYS",
]

log = logging.getLogger(__name__)

METRIC_KEYS = ("mAP", "rank1", "rank5", "rank10", "mINP")


@dataclass
class FeatureSet:
    feats: torch.Tensor  # [N, D] float32, CPU
    pids: np.ndarray  # [N] int64
    camids: np.ndarray  # [N] int64
    sceneids: np.ndarray  # [N] int64
    token_masks: np.ndarray | None = None  # [N, patches] bool: SFTS's kept tokens (keep_token_masks=True)

    def __iter__(self):  # allows ``feats, pids, camids, sceneids = extract_features(...)``
        return iter((self.feats, self.pids, self.camids, self.sceneids))


def batch_images(batch: dict, device: torch.device, present: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """The model's image dict for a collated batch, on ``device``.

    ``present``: the modalities that carry data (default: every modality in the batch). The
    others are left out and the model feeds them as zero images (the TOP-ReID / DeMo convention
    for missing-modality evaluation), so its feature width stays that of the full input.
    """
    keys = [m for m in batch if m not in SAMPLE_KEYS and (present is None or m in present)]
    if not keys:
        wanted = list(present) if present is not None else "any modality"
        raise KeyError(f"batch holds none of the modalities {wanted}; it has {sorted(batch)}")
    return {m: batch[m].to(device, non_blocking=True) for m in keys}


@torch.no_grad()
def extract_features(model: nn.Module, loader: Iterable[dict], device: torch.device | str, amp: str = "none",
                     modalities: Sequence[str] | None = None, keep_token_masks: bool = False) -> FeatureSet:
    """Run ``model`` (in eval mode) over ``loader`` and return the retrieval features.

    Features are accumulated on the device and copied to the host once at the end, so there is
    no host synchronisation per batch; ids come from the collated batch (already on the host).
    ``modalities``: those of the batch's modalities that carry data; the model fills the rest
    with zero images (missing-modality tests). ``keep_token_masks``: also keep each sample's
    selected-token mask (the model's ``last_token_mask``; EDITOR sets it on every forward).
    The model's train/eval mode is restored afterwards.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    pids: list[torch.Tensor] = []
    camids: list[torch.Tensor] = []
    sceneids: list[torch.Tensor] = []
    token_masks: list[torch.Tensor] = []
    try:
        for batch in loader:
            images = batch_images(batch, device, modalities)
            cams = batch["camid"].to(device, non_blocking=True)
            with autocast_context(device, amp):
                feat = model(images, cams)  # [B, 3D]
            chunks.append(feat.float())
            if keep_token_masks:
                token_masks.append(unwrap_model(model).last_token_mask.cpu())
            pids.append(torch.as_tensor(batch["pid"]))
            camids.append(torch.as_tensor(batch["camid"]))
            sceneids.append(torch.as_tensor(batch.get("sceneid", torch.full_like(batch["pid"], -1))))
    finally:
        model.train(was_training)
    if not chunks:
        raise ValueError("extract_features: the loader yielded no batches")
    on_device = torch.cat(chunks)
    if on_device.device.type == "cuda":
        feats = torch.empty(on_device.shape, dtype=torch.float32, pin_memory=True)
        feats.copy_(on_device, non_blocking=True)
        torch.cuda.current_stream(on_device.device).synchronize()
    else:
        feats = on_device
    return FeatureSet(
        feats=feats,
        pids=torch.cat(pids).numpy().astype(np.int64),
        camids=torch.cat(camids).numpy().astype(np.int64),
        sceneids=torch.cat(sceneids).numpy().astype(np.int64),
        token_masks=torch.cat(token_masks).numpy().astype(bool) if keep_token_masks else None,
    )


class FeatureCache:
    """The query and gallery features of one test split per fed modality subset, each extracted
    once on first use (``get(side, subset)``). Where query and gallery are one sample list
    (RGBNT201, ``gallery_loader`` None) the gallery side is the query side. The token masks are
    kept too when ``keep_token_masks``."""

    def __init__(self, model: nn.Module, query_loader: Iterable[dict], gallery_loader: Iterable[dict] | None,
                 device: torch.device | str, *, amp: str = "none", keep_token_masks: bool = False):
        self.model = model
        self.loaders = {"query": query_loader, "gallery": gallery_loader}
        self.device = device
        self.amp = amp
        self.keep_token_masks = keep_token_masks
        self._features: dict[tuple[str, tuple[str, ...]], FeatureSet] = {}

    def _key(self, side: str, subset: Sequence[str]) -> tuple[str, tuple[str, ...]]:
        if side not in self.loaders:
            raise ValueError(f"side must be 'query' or 'gallery', got {side!r}")
        return (side if self.loaders["gallery"] is not None else "query", tuple(subset))

    def put(self, side: str, subset: Sequence[str], features: FeatureSet) -> None:
        """Use ``features`` for this side and subset (features computed elsewhere)."""
        self._features[self._key(side, subset)] = features

    def get(self, side: str, subset: Sequence[str]) -> FeatureSet:
        key = self._key(side, subset)
        if key not in self._features:
            self._features[key] = extract_features(self.model, self.loaders[key[0]], self.device, amp=self.amp,
                                                   modalities=key[1], keep_token_masks=self.keep_token_masks)
        return self._features[key]


def evaluate_features(cfg: Config, query: FeatureSet, gallery: FeatureSet, protocol: str, *,
                      rerank: bool = False) -> dict:
    """mAP / CMC / mINP for query vs gallery features under the dataset's protocol.

    Features are L2-normalised when ``cfg.test.feat_norm``; distances follow
    ``cfg.test.distance``. With ``rerank`` the full distance matrices are built and
    k-reciprocal re-ranking (``cfg.test.rerank_k1/k2/lambda``) is applied.
    """
    t = cfg.test
    ids = dict(q_pids=query.pids, g_pids=gallery.pids, q_camids=query.camids, g_camids=gallery.camids,
               protocol=protocol, max_rank=t.max_rank)
    if protocol == "same_scene":
        ids.update(q_sceneids=query.sceneids, g_sceneids=gallery.sceneids)
    if not rerank:
        return metrics.evaluate_features(query.feats, gallery.feats, metric=t.distance, normalize=t.feat_norm, **ids)
    q_g = metrics.pairwise_distance(query.feats, gallery.feats, metric=t.distance, normalize=t.feat_norm)
    q_q = metrics.pairwise_distance(query.feats, query.feats, metric=t.distance, normalize=t.feat_norm)
    g_g = metrics.pairwise_distance(gallery.feats, gallery.feats, metric=t.distance, normalize=t.feat_norm)
    distmat = metrics.re_ranking(q_g, q_q, g_g, k1=t.rerank_k1, k2=t.rerank_k2, lambda_value=t.rerank_lambda)
    return metrics.evaluate_rank(distmat, **ids)


def summarize(result: dict) -> dict[str, float]:
    """The five headline metrics as plain floats (fractions)."""
    return {k: float(result[k]) for k in METRIC_KEYS}


def _same_samples(a: list, b: list) -> bool:
    return a is b or (len(a) == len(b) and all(x == y for x, y in zip(a, b)))


def evaluate_model(cfg: Config, model: nn.Module, splits, device: torch.device | str, *,
                   modalities: Sequence[str] | None = None, rerank: bool = False, amp: str = "none",
                   loaders: tuple | None = None) -> dict[str, float]:
    """Extract query and gallery features with ``model`` and return the headline metrics.

    ``splits`` is a :class:`editor_reid.data.layouts.DatasetSplits`; ``loaders`` may pass
    prebuilt ``(query_loader, gallery_loader or None)`` to skip rebuilding them (the training
    loop evaluates every few epochs). When query and gallery are the same list (RGBNT201),
    features are extracted once.
    """
    if loaders is None:
        loaders = build_eval_loaders(cfg, splits)
    query_loader, gallery_loader = loaders
    model = unwrap_model(model)
    query = extract_features(model, query_loader, device, amp=amp, modalities=modalities)
    gallery = query if gallery_loader is None else extract_features(
        model, gallery_loader, device, amp=amp, modalities=modalities)
    result = evaluate_features(cfg, query, gallery, splits.protocol, rerank=rerank)
    if result.get("num_skipped_queries"):
        log.debug("%d queries had no valid gallery match and were skipped", result["num_skipped_queries"])
    return summarize(result)


def build_eval_loaders(cfg: Config, splits) -> tuple:
    """(query loader, gallery loader) — the gallery loader is None when it equals the query."""
    query_loader = build_test_loader(cfg, splits.query)
    gallery_loader = None if _same_samples(splits.query, splits.gallery) else build_test_loader(cfg, splits.gallery)
    return query_loader, gallery_loader
