"""EDITOR training losses: label-smoothed ID loss, batch-hard triplet, BCC and OCFR.

Official behaviour followed: docs/official-behaviour.md#losses.

Each loss is a plain function or a small module; :class:`EditorCriterion` combines them per
supervision setting (AL=1 / AL=0, docs/official-behaviour.md#loss-total) from the model's training output. The
criterion reads the output by attribute (duck typing), so this module does not import the model.

All losses are computed in float32, whatever the autocast dtype of their inputs: distances,
log-softmax and squared differences are where fp16 loses precision.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from editor_reid.errors import EditorReidError
from editor_reid.modalities import MODALITIES, canonical_order

__all__ = [
    "cross_entropy_label_smooth",
    "euclidean_dist",
    "hard_example_mining",
    "triplet_loss",
    "soft_margin_triplet",
    "bcc_loss",
    "OCFRLoss",
    "EditorCriterion",
    "LOSS_TERMS",
    "NonFiniteLossError",
    "check_finite",
]

# Keys of the per-term dict returned by EditorCriterion.forward, in logging order.
LOSS_TERMS = ("id_fused", "tri_fused", "id_backbone", "tri_backbone", "bcc", "ocfr")

# Official checkpoints name the modalities RGB / NIR / TIR.
_MODALITY_ALIASES = {"RGB": "RGB", "NI": "NI", "NIR": "NI", "TI": "TI", "TIR": "TI"}

Gather = Callable[[torch.Tensor], torch.Tensor]
AllReduce = Callable[[torch.Tensor], "torch.Tensor | None"]


def cross_entropy_label_smooth(logits: torch.Tensor, targets: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    """Cross-entropy against (1-eps)*onehot + eps/K, averaged over the batch (docs/official-behaviour.md#loss-id).

    ``logits`` [B, K], ``targets`` [B] class indices. ``eps=0`` is plain cross-entropy.
    """
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_label_smooth: expected logits [B,K] and targets [B], got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    log_probs = F.log_softmax(logits.float(), dim=1)
    num_classes = logits.shape[1]
    smooth = torch.full_like(log_probs, eps / num_classes)
    smooth.scatter_add_(1, targets.long().unsqueeze(1), torch.full_like(log_probs[:, :1], 1.0 - eps))
    return -(smooth * log_probs).sum(dim=1).mean()


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances [M, N] = sqrt(clamp(|x|^2 + |y|^2 - 2 x.y, 1e-12))
    (docs/official-behaviour.md#loss-triplet)."""
    # Autocast would run the matmul in fp16, where |x|^2 + |y|^2 - 2 x.y cancels badly.
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        y = y.float()
        xx = x.pow(2).sum(dim=1, keepdim=True)  # [M, 1]
        yy = y.pow(2).sum(dim=1, keepdim=True).t()  # [1, N]
        return torch.addmm(xx + yy, x, y.t(), beta=1.0, alpha=-2.0).clamp(min=1e-12).sqrt()


def hard_example_mining(dist: torch.Tensor, anchor_labels: torch.Tensor, labels: torch.Tensor):
    """Batch-hard mining: (hardest positive = max, hardest negative = min) per anchor row.

    ``dist`` [M, N] from M anchors to N candidates. An anchor without any negative gets an
    infinite d_an, so it contributes zero loss (a batch with a single identity has no triplets).
    """
    is_pos = anchor_labels.unsqueeze(1) == labels.unsqueeze(0)  # [M, N]
    d_ap = dist.masked_fill(~is_pos, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(is_pos, float("inf")).amin(dim=1)
    return d_ap, d_an


def triplet_loss(
    feat: torch.Tensor,
    targets: torch.Tensor,
    margin: float | None = None,
    gather: Gather | None = None,
) -> torch.Tensor:
    """Batch-hard triplet loss on (pre-BN, unnormalised) features ``feat`` [B, C]
    (docs/official-behaviour.md#loss-triplet).

    ``margin=None`` is the official soft margin, mean softplus(d_ap - d_an)
    (= log(1 + exp(-(d_an - d_ap)))); a number gives mean relu(d_ap - d_an + margin).

    ``gather`` widens the mining pool for ``model.triplet_scope = "global"``: a callable that
    returns the concatenation over ranks (dim 0) of the tensor it is given. It is called on
    ``feat`` and on ``targets``; the local rows stay the anchors and the gathered rows are the
    candidates. For the gathered rows of other ranks to receive gradients the callable must be
    differentiable (e.g. ``torch.distributed.nn.functional.all_gather``); the loss is the mean
    over local anchors, so DDP's gradient averaging yields the mean over the global batch.
    """
    if feat.dim() != 2 or targets.shape != feat.shape[:1]:
        raise ValueError(f"triplet_loss: expected feat [B,C] and targets [B], got "
                         f"{tuple(feat.shape)} and {tuple(targets.shape)}")
    pool, pool_labels = feat, targets
    if gather is not None:
        pool, pool_labels = gather(feat), gather(targets)
    dist = euclidean_dist(feat, pool)
    d_ap, d_an = hard_example_mining(dist, targets, pool_labels)
    if margin is None:
        return F.softplus(d_ap - d_an).mean()
    return F.relu(d_ap - d_an + margin).mean()


def soft_margin_triplet(feat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The official triplet loss: batch-hard, soft margin (``model.no_margin = True``)."""
    return triplet_loss(feat, targets, margin=None)


def bcc_loss(tokens: Mapping[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Background Consistency Constraint (docs/official-behaviour.md#loss-bcc).

    ``tokens``: modality -> backbone tokens after the final LN, [B, 1+N, D] (CLS first).
    ``mask``: [B, N] bool, True = selected (foreground, M_U). Background patch tokens are
    compared pairwise across modalities with an MSE whose mean runs over ALL B*N*D elements
    (foreground zeros count in the denominator, as in the official code). Pairs follow the
    order RGB, NI, TI (then any other modality as given; :func:`canonical_order`): M modalities give
    M(M-1)/2 terms (three give three, two give one, one gives 0).
    """
    names = canonical_order(list(tokens))
    if len(names) < 2:
        any_tokens = next(iter(tokens.values()), None)
        device = any_tokens.device if any_tokens is not None else mask.device
        return torch.zeros((), device=device)
    background = (~mask.bool()).unsqueeze(-1)  # [B, N, 1]
    masked = {}
    for name in names:
        tok = tokens[name]
        if tok.dim() != 3 or tok.shape[0] != mask.shape[0] or tok.shape[1] != mask.shape[1] + 1:
            raise ValueError(f"bcc_loss: tokens['{name}'] has shape {tuple(tok.shape)}; expected "
                             f"[B, 1+N, D] matching mask [B, N] = {tuple(mask.shape)}")
        masked[name] = tok[:, 1:, :].float() * background
    total = torch.zeros((), device=mask.device)
    for a, b in combinations(names, 2):
        total = total + F.mse_loss(masked[a], masked[b])
    return total


class OCFRLoss(nn.Module):
    """Object-Centric Feature Refinement (docs/official-behaviour.md#loss-ocfr) with EMA class centres per modality.

    Buffers ``<modality>_centers`` [num_classes, dim] start at zero and travel in the state dict
    (never in the optimiser). In training mode each forward first updates the centres of the
    labels present in the batch, in place and without gradient, C_y <- m*mean_y + (1-m)*C_y
    (``momentum`` weighs the NEW batch mean, as in the official code), then returns
    ``weight * sum_m MSE(C_{y_i}, f_i / |f_i|)``. Samples are grouped by label with
    ``index_add_``, so the batch need not be laid out as contiguous P x K blocks.

    ``all_reduce``: for ``model.ocfr_scope = "global"``, a callable that sums a tensor over
    ranks (in place, or returning the sum), or a ``torch.distributed`` process group. The
    per-class feature sums and counts are summed over ranks before the EMA update, so every
    rank holds identical centres. None = single process.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        modalities: tuple[str, ...] | list[str] = MODALITIES,
        momentum: float = 0.8,
        weight: float = 1.0,
        all_reduce: AllReduce | Any | None = None,
    ) -> None:
        super().__init__()
        if num_classes <= 0 or dim <= 0:
            raise ValueError(f"OCFRLoss: num_classes and dim must be positive, got {num_classes}, {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"OCFRLoss: momentum must lie in [0, 1], got {momentum} (config key model.ocfr_momentum)")
        self.num_classes = num_classes
        self.dim = dim
        self.modalities = tuple(modalities)
        self.momentum = momentum
        self.weight = weight
        self.all_reduce = all_reduce
        for m in self.modalities:
            self.register_buffer(f"{m}_centers", torch.zeros(num_classes, dim))

    def centers(self, modality: str) -> torch.Tensor:
        """The centre buffer [num_classes, dim] of ``modality``."""
        if modality not in self.modalities:
            raise KeyError(f"OCFRLoss has no centres for modality '{modality}'; it has {list(self.modalities)}")
        return getattr(self, f"{modality}_centers")

    def _sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.all_reduce is None:
            return tensor
        if callable(self.all_reduce):
            result = self.all_reduce(tensor)
            return tensor if result is None else result
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.all_reduce)
        return tensor

    @torch.no_grad()
    def update_centers(self, modality: str, feats: torch.Tensor, targets: torch.Tensor) -> None:
        """EMA update of the centres of the labels in ``targets`` from L2-normalised ``feats`` [B, D]."""
        centers = self.centers(modality)
        # One collective per modality: columns [0, D) hold the feature sums, column D the counts.
        stats = torch.zeros(self.num_classes, self.dim + 1, device=centers.device, dtype=torch.float32)
        rows = torch.cat([feats.float(), torch.ones_like(feats[:, :1], dtype=torch.float32)], dim=1)
        stats.index_add_(0, targets.long().to(centers.device), rows.to(centers.device))
        stats = self._sum_over_ranks(stats)
        counts = stats[:, self.dim : self.dim + 1]  # [K, 1]
        batch_mean = stats[:, : self.dim] / counts.clamp(min=1.0)
        updated = self.momentum * batch_mean + (1.0 - self.momentum) * centers.float()
        # torch.where instead of boolean indexing: no host-device synchronisation.
        centers.copy_(torch.where(counts > 0, updated, centers.float()))

    def forward(self, feats: Mapping[str, torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        """``feats``: modality -> HMA stage-1 CLS [B, D]; ``targets`` [B] labels in [0, num_classes)."""
        if bool(((targets < 0) | (targets >= self.num_classes)).any()):
            raise ValueError(f"OCFRLoss: labels must lie in [0, {self.num_classes}), got range "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        total = None
        for modality, feat in feats.items():
            if feat.dim() != 2 or feat.shape != (targets.shape[0], self.dim):
                raise ValueError(f"OCFRLoss: feats['{modality}'] has shape {tuple(feat.shape)}; "
                                 f"expected [B, {self.dim}] with B = {targets.shape[0]}")
            normed = F.normalize(feat.float(), dim=1)
            if self.training:
                self.update_centers(modality, normed.detach(), targets)
            target_centers = self.centers(modality)[targets.long()].to(normed.device)  # [B, D], a copy
            term = F.mse_loss(normed, target_centers)
            total = term if total is None else total + term
        if total is None:
            return torch.zeros((), device=targets.device)
        return self.weight * total

    def load_official_centers(self, centers: Mapping[str, torch.Tensor]) -> None:
        """Copy centres {"RGB": [K, D], "NI": ..., "TI": ...} into the buffers.

        Official names are accepted too ("NIR"/"TIR", with or without a "_centers" suffix).
        """
        for key, value in centers.items():
            name = key[: -len("_centers")] if key.endswith("_centers") else key
            modality = _MODALITY_ALIASES.get(name)
            if modality is None or modality not in self.modalities:
                raise KeyError(f"load_official_centers: unknown modality key '{key}'; expected one of "
                               f"{list(self.modalities)}")
            buffer = self.centers(modality)
            value = torch.as_tensor(value)
            if value.shape != buffer.shape:
                raise ValueError(f"load_official_centers: centres '{key}' have shape {tuple(value.shape)}, "
                                 f"expected {tuple(buffer.shape)} (num_classes, dim)")
            buffer.copy_(value.to(buffer.dtype))


class EditorCriterion(nn.Module):
    """The total EDITOR loss for one training output (docs/official-behaviour.md#loss-total).

    AL=1: [CE(fused) + Tri(fused_feat)] + [CE(ori) + Tri(ori)] + BCC + OCFR.
    AL=0: [CE(fused) + Tri(fused_feat)] + sum_m [CE(s_m) + Tri(F_m cls)] + BCC + OCFR.
    The setting is read from the output itself (lengths of ``backbone_logits`` /
    ``backbone_feats``), so one criterion serves both.

    ``forward`` returns ``(total, terms)``; ``terms`` holds the weighted contribution of each
    key in :data:`LOSS_TERMS`, so ``total == sum(terms.values())``. Disabled terms are zero.

    ``gather`` / ``all_reduce`` are the distributed hooks of :func:`triplet_loss` and
    :class:`OCFRLoss`; they are used only when ``model.triplet_scope`` / ``model.ocfr_scope``
    is "global".
    """

    def __init__(
        self,
        cfg,
        num_classes: int,
        dim: int,
        *,
        gather: Gather | None = None,
        all_reduce: AllReduce | Any | None = None,
    ) -> None:
        super().__init__()
        m = cfg.model
        self.id_weight = m.id_loss_weight
        self.triplet_weight = m.triplet_loss_weight
        self.eps = m.label_smooth_eps if m.if_labelsmooth else 0.0
        self.margin = None if m.no_margin else cfg.solver.margin
        self.use_bcc = m.bcc
        self.bcc_weight = m.bcc_weight
        self.use_ocfr = m.ocfr
        self.gather = gather if m.triplet_scope == "global" else None
        self.ocfr = OCFRLoss(
            num_classes,
            dim,
            canonical_order(cfg.datasets.modalities),
            momentum=m.ocfr_momentum,
            weight=m.ocfr_weight,
            all_reduce=all_reduce if m.ocfr_scope == "global" else None,
        )

    def _id(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy_label_smooth(logits, targets, self.eps)

    def _tri(self, feat: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return triplet_loss(feat, targets, self.margin, gather=self.gather)

    def forward(self, out, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = out.fused_logits.device
        zero = torch.zeros((), device=device)
        if len(out.backbone_logits) != len(out.backbone_feats):
            raise ValueError(f"EditorCriterion: {len(out.backbone_logits)} backbone logits but "
                             f"{len(out.backbone_feats)} backbone features; they are paired")
        terms: dict[str, torch.Tensor] = {
            "id_fused": self.id_weight * self._id(out.fused_logits, targets),
            "tri_fused": self.triplet_weight * self._tri(out.fused_feat, targets),
            "id_backbone": self.id_weight * sum((self._id(s, targets) for s in out.backbone_logits), zero),
            "tri_backbone": self.triplet_weight * sum((self._tri(f, targets) for f in out.backbone_feats), zero),
            "bcc": zero,
            "ocfr": zero,
        }
        if self.use_bcc and out.backbone_tokens and out.token_mask is not None:
            terms["bcc"] = self.bcc_weight * bcc_loss(out.backbone_tokens, out.token_mask)
        if self.use_ocfr and out.hma_cls:
            terms["ocfr"] = self.ocfr(out.hma_cls, targets)
        total = sum(terms.values(), zero)
        return total, terms

    def load_official_centers(self, centers: Mapping[str, torch.Tensor]) -> None:
        """Load OCFR centres from an official checkpoint; see :meth:`OCFRLoss.load_official_centers`."""
        self.ocfr.load_official_centers(centers)


class NonFiniteLossError(EditorReidError, FloatingPointError):
    """A loss term became NaN or infinite; names the term(s), epoch and step."""

    def __init__(self, terms: dict[str, float], epoch: int, step: int) -> None:
        self.terms = terms
        self.epoch = epoch
        self.step = step
        listed = ", ".join(f"'{name}' = {value}" for name, value in terms.items())
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}: {listed}")


def check_finite(terms: Mapping[str, torch.Tensor | float], epoch: int, step: int) -> None:
    """Raise :class:`NonFiniteLossError` naming every NaN/inf term (one device sync in all)."""
    finite: dict[str, bool] = {}
    tensors = {name: v for name, v in terms.items() if isinstance(v, torch.Tensor)}
    if tensors:
        device = next(iter(tensors.values())).device
        flags = torch.stack([torch.isfinite(v.detach()).all().to(device) for v in tensors.values()])
        finite.update(zip(tensors, flags.tolist()))
    for name, value in terms.items():
        if name not in tensors:
            finite[name] = math.isfinite(float(value))
    bad = {}
    for name, value in terms.items():
        if not finite[name]:
            bad[name] = value.detach().float().cpu().tolist() if isinstance(value, torch.Tensor) else float(value)
    if bad:
        raise NonFiniteLossError(bad, epoch, step)
