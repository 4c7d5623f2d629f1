"""The numbers behind the report, from one evaluation (:class:`~editor_reid.engine.evaluate.TestRun`):
the modality-subset and cross-modality tables, the distance matrix, per-query AP, CMC, ROC,
per-camera mAP, the share of kept tokens on the object and the rank lists. No HTML here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from editor_reid import metrics
from editor_reid.data.synthetic import load_mask, mask_path_for
from editor_reid.engine.evaluate import TestRun
from editor_reid.engine.inference import METRIC_KEYS, FeatureSet, evaluate_features, summarize
from editor_reid.engine.visualize import (
    OBJECT_PATCH_THRESHOLD,
    mask_at_size,
    patch_object_fraction,
    token_object_overlap,
)
from editor_reid.errors import UsageError
from editor_reid.metrics.roc import point_at
from editor_reid.modalities import cross_modality_pairs, modality_subsets, pair_name, subset_name

__all__ = ["ReportData", "CMC_RANKS", "RANK_LIST", "ROC_FPRS"]

CMC_RANKS = 50
RANK_LIST = 10  # gallery entries shown per query
ROC_FPRS = (1e-4, 1e-3, 1e-2, 1e-1)


def _has_mask(path) -> bool:
    """Whether ``make-synthetic`` wrote an object mask for this image."""
    if path is None:
        return False
    try:
        return mask_path_for(path).is_file()
    except ValueError:  # not inside a dataset folder (a manifest's own files)
        return False


def _average(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in METRIC_KEYS}


@dataclass
class ObjectShare:
    """How many of SFTS's kept tokens lie on the object, against as many random tokens."""

    selected_on_object: float
    random_on_object: float
    object_patch_fraction: float
    selected_per_image: float
    patches_per_image: int
    images: int


class ReportData:
    """Everything the sections show, computed from the features of ``run`` (extracting the
    modality subsets it lacks) and the distance matrix of the full-modality features."""

    def __init__(self, run: TestRun, seed: int):
        self.run = run
        self.cfg = run.cfg
        self.splits = run.splits
        self.protocol = run.splits.protocol
        self.seed = seed
        full = tuple(self.cfg.datasets.modalities)
        self.full_name = subset_name(full)
        get = run.features.get
        self.query: FeatureSet = get("query", full)
        self.gallery: FeatureSet = get("gallery", full)
        self.subsets = {subset_name(s): self._summary(get("query", s), get("gallery", s))
                        for s in modality_subsets(full)}
        if len(self.subsets) > 1:
            self.subsets["average"] = _average(list(self.subsets.values()))
        pairs = cross_modality_pairs(full)
        self.cross = {pair_name(q, g): self._summary(get("query", q), get("gallery", g)) for q, g in pairs}
        if self.cross:
            self.cross["average"] = _average(list(self.cross.values()))
        t = self.cfg.test
        d = metrics.pairwise_distance(self.query.feats, self.gallery.feats, metric=t.distance, normalize=t.feat_norm)
        self.distmat = np.asarray(d.cpu() if torch.is_tensor(d) else d, dtype=np.float32)
        full_result = metrics.evaluate_rank(self.distmat, **self._ids(), max_rank=CMC_RANKS, per_query=True)
        self.metrics = self.subsets[self.full_name]  # computed as `test` computes it (from the features)
        self.cmc = np.asarray(full_result["cmc"])
        self.query_ap = full_result["query_ap"]
        self.roc_fpr, self.roc_tpr = metrics.pair_roc(self.distmat, **self._ids())
        # The protocol removes only same-identity pairs: every different-identity pair is kept.
        same = int((self.query.pids[:, None] == self.gallery.pids[None, :]).sum())
        self.num_negative_pairs = len(self.query.pids) * len(self.gallery.pids) - same

    # ------------------------------------------------------------------ evaluation pieces

    def _ids(self, rows: np.ndarray | None = None, cols: np.ndarray | None = None) -> dict:
        q, g = self.query, self.gallery
        rows = slice(None) if rows is None else rows
        cols = slice(None) if cols is None else cols
        ids = dict(q_pids=q.pids[rows], g_pids=g.pids[cols], q_camids=q.camids[rows], g_camids=g.camids[cols],
                   protocol=self.protocol)
        if self.protocol == "same_scene":
            ids.update(q_sceneids=q.sceneids[rows], g_sceneids=g.sceneids[cols])
        return ids

    def _summary(self, query: FeatureSet, gallery: FeatureSet) -> dict[str, float]:
        return summarize(evaluate_features(self.cfg, query, gallery, self.protocol))

    def tpr_at(self, fpr: float) -> float:
        """TPR at the ROC point nearest ``fpr``; NaN where the split has too few different-identity
        pairs to measure that rate (fewer than 1 / fpr)."""
        if fpr * self.num_negative_pairs < 1:
            return float("nan")
        return point_at(self.roc_fpr, self.roc_tpr, fpr)

    def camera_map(self) -> tuple[list[int], list[int], dict[tuple[int, int], float | None]]:
        """mAP of the queries of each camera against the gallery of each camera (None where
        the protocol leaves those queries no relevant item)."""
        qc, gc = np.unique(self.query.camids), np.unique(self.gallery.camids)
        cells: dict[tuple[int, int], float | None] = {}
        for a in qc:
            rows = np.flatnonzero(self.query.camids == a)
            for b in gc:
                cols = np.flatnonzero(self.gallery.camids == b)
                r = metrics.evaluate_rank(self.distmat[np.ix_(rows, cols)], **self._ids(rows, cols), max_rank=1)
                cells[int(a), int(b)] = r["mAP"] if r["num_valid_queries"] else None
        return [int(c) for c in qc], [int(c) for c in gc], cells

    # ------------------------------------------------------------------ rank lists

    def ranked(self, i: int) -> list[int]:
        """The first RANK_LIST gallery indices of query ``i`` by distance, without the items the
        protocol removes (same identity and same camera, or scene)."""
        keys = ("sceneids", "sceneids") if self.protocol == "same_scene" else ("camids", "camids")
        qk, gk = getattr(self.query, keys[0]), getattr(self.gallery, keys[1])
        junk = (self.gallery.pids == self.query.pids[i]) & (gk == qk[i])
        order = np.argsort(self.distmat[i], kind="stable")
        return [int(j) for j in order if not junk[j]][:RANK_LIST]

    def chosen_queries(self, max_queries: int, named: Sequence[str | int] = ()) -> dict[str, list[int]]:
        """The queries whose rank lists are shown: the hardest (lowest AP), random ones (seeded)
        and those ``named`` (query indices, or image paths / file names of a query sample)."""
        ap = self.query_ap
        valid = np.flatnonzero(~np.isnan(ap))
        groups: dict[str, list[int]] = {}
        if named:
            groups["named"] = list(dict.fromkeys(self._query_index(n) for n in named))
            valid = np.setdiff1d(valid, groups["named"])
        if len(valid) and max_queries:
            half = max(1, max_queries // 2)
            hardest = [int(i) for i in valid[np.argsort(ap[valid], kind="stable")][:half]]
            rest = np.setdiff1d(valid, hardest)
            rng = np.random.default_rng(self.seed)
            count = min(max_queries - len(hardest), len(rest))
            groups["hardest"] = hardest
            groups["random"] = sorted(int(i) for i in rng.choice(rest, size=count, replace=False)) if count > 0 else []
        return groups

    def _query_index(self, name: str | int) -> int:
        queries = self.splits.query
        text = str(name).strip()
        if text.isdigit():
            index = int(text)
            if index >= len(queries):
                raise UsageError(f"query {index}: the test split has {len(queries)} queries (indices 0 to "
                                 f"{len(queries) - 1})")
            return index
        found = [i for i, sample in enumerate(queries)
                 if any(str(p) == text or str(p).endswith("/" + text) for p in sample.paths.values())]
        if len(found) == 1:
            return found[0]
        if found:
            raise UsageError(f"query '{text}' names {len(found)} query samples (indices {found[:5]}); give more of the "
                             "path, or an index")
        raise UsageError(f"query '{text}': no query sample has an image with this path or file name (give a path, a "
                         "file name or an index into the query split)")

    # ------------------------------------------------------------------ tokens on the object

    def object_share(self) -> ObjectShare | None:
        """The share of kept tokens on the object over every query sample, where the dataset
        has object masks (synthetic data) and the token masks were kept; else None."""
        masks = self.query.token_masks
        samples = self.splits.query
        if masks is None or not samples:
            return None
        if not all(_has_mask(s.paths.get("RGB")) for s in samples):
            return None
        grid = tuple(self.run.model.grid_size)
        size = tuple(self.cfg.input.size_test)
        on_object = np.stack([patch_object_fraction(mask_at_size(load_mask(s, "RGB"), size), grid)
                              >= OBJECT_PATCH_THRESHOLD for s in samples])
        stats = token_object_overlap(masks, on_object, self.seed)
        return ObjectShare(**{k: stats[k] for k in ObjectShare.__dataclass_fields__})
