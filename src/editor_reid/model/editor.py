"""EDITOR assembly: shared backbone -> SFTS -> HMA -> heads (docs/official-behaviour.md#backbone, #sfts, #hma).

Module map (official names in brackets, docs/official-behaviour.md#checkpoint-layout;
:mod:`editor_reid.model.official` converts):

* ``backbone``  [BACKBONE.base]: timm ViT + ``sie_embed`` + unused ``fc``;
* ``sfts``      [SFTS, FREQ_INDEX]: token selection, no parameters;
* ``hma``       [FUSE_block, *_REDUCE]: ``modal_blocks.{RGB,NI,TI}``, ``fusion_block``,
  ``out_norm``, ``reduce.{RGB,NI,TI}``;
* ``fuse_bn`` / ``fuse_head`` [FUSE_BN / FUSE_HEAD] on f_HMA;
* ``backbone_bn`` / ``backbone_head`` [BACKBONE_BN / BACKBONE_HEAD], always built; used for the
  per-modality backbone CLS when ``al == 0``;
* ``al_bn`` / ``al_head`` [AL_BN / AL_HEAD], only when ``al == 1``: on the concatenated
  backbone CLS.

Switches: ``sfts=False`` keeps every patch token (M_U all True); ``hma=False`` (ablation rows
A/B) makes the retrieval feature the concatenated backbone CLS tokens [B, M·D] with the fused
head on it. ``modalities`` (``datasets.modalities``; RGB, NI, TI by default) are the model's M
modalities: HMA has one block per modality, SFTS unions over them and the feature is [B, M·D]
(3D for the benchmarks). All M always go through the model: a modality missing from the input
dict is a zero image, which is how the data layer represents an absent modality after
normalisation; the feature keeps its [B, M·D] layout. No losses, logging or I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from editor_reid.model.backbone import ViTBackbone, build_backbone
from editor_reid.model.hma import HMA
from editor_reid.model.pretrained import load_pretrained
from editor_reid.model.sfts import SFTS, frequency_scores, spatial_mask, topk_mask
from editor_reid.modalities import MODALITIES, absent_like, canonical_order, check_modalities

__all__ = [
    "EDITOR",
    "EditorEvalOutput",
    "EditorTrainOutput",
    "SelectionMaps",
    "build_model",
    "count_parameters",
]


@dataclass
class EditorTrainOutput:
    fused_logits: torch.Tensor  # [B, K]
    fused_feat: torch.Tensor  # [B, M·D] pre-BN f_HMA
    backbone_logits: list[torch.Tensor]  # AL=1: [ori_logits]; AL=0: one per modality [s_R, s_N, s_T]
    backbone_feats: list[torch.Tensor]  # AL=1: [ori [B, M·D]]; AL=0: one CLS [B, D] per modality
    backbone_tokens: dict[str, torch.Tensor]  # final-LN backbone tokens per modality [B, 1+N, D] (BCC input)
    token_mask: torch.Tensor  # M_U [B, N] bool (all True when SFTS is off)
    hma_cls: dict[str, torch.Tensor] | None  # HMA stage-1 CLS per modality [B, D] (OCFR input); None if HMA off


@dataclass
class EditorEvalOutput:
    feature: torch.Tensor  # [B, M·D] pre-BN f_HMA
    token_mask: torch.Tensor  # [B, N] bool


@dataclass
class SelectionMaps:
    """What SFTS's selection came from (:meth:`EDITOR.selection_maps`), for pictures."""

    rollout: torch.Tensor  # [M, B, h, N] per modality (the model's order): CLS row of A_L···A_1 per head
    frequency_scores: torch.Tensor  # [B, N] the per-patch frequency score
    spatial: torch.Tensor  # [B, N] bool: the patches the rollout keeps (union over heads and modalities)
    frequency: torch.Tensor  # [B, N] bool: the top frequency_keep patches
    mask: torch.Tensor  # [B, N] bool: spatial | frequency, M_U as the forward pass selects it


def _bn_neck(dim: int) -> nn.BatchNorm1d:
    # trainable bias, unlike TransReID's BNNeck (docs/official-behaviour.md#heads-and-feature)
    bn = nn.BatchNorm1d(dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return bn


def _classifier(dim: int, num_classes: int) -> nn.Linear:
    head = nn.Linear(dim, num_classes, bias=False)
    nn.init.normal_(head.weight, std=0.001)
    return head


class EDITOR(nn.Module):
    """The EDITOR model. Build it with :func:`build_model`."""

    def __init__(
        self,
        backbone: ViTBackbone,
        num_classes: int,
        *,
        modalities: Sequence[str] = MODALITIES,
        sfts: bool = True,
        head_keep: int = 2,
        frequency_keep: int = 10,
        frequency_mode: str = "official",
        sfts_ties: str = "torch",
        hma: bool = True,
        hma_heads: int = 0,
        al: int = 1,
    ) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if al not in (0, 1):
            raise ValueError(f"model.al must be 0 or 1, got {al}")
        dim = backbone.embed_dim
        problem = check_modalities(modalities)
        if problem:
            raise ValueError(f"modalities {list(modalities)}: {problem}")
        self.modalities = canonical_order(modalities)
        feat_dim = dim * len(self.modalities)
        self.num_classes = num_classes
        self.embed_dim = dim
        self.feat_dim = feat_dim
        self.use_sfts = sfts
        self.use_hma = hma
        self.al = al
        self.backbone = backbone
        self.sfts = SFTS(head_keep, frequency_keep, frequency_mode, patch_size=16, ties=sfts_ties)
        self.hma = HMA(dim, hma_heads or backbone.num_heads, self.modalities) if hma else None
        self.fuse_bn = _bn_neck(feat_dim)
        self.fuse_head = _classifier(feat_dim, num_classes)
        self.backbone_bn = _bn_neck(dim)
        self.backbone_head = _classifier(dim, num_classes)
        if al == 1:
            self.al_bn = _bn_neck(feat_dim)
            self.al_head = _classifier(feat_dim, num_classes)
        else:
            self.al_bn = None
            self.al_head = None
        self.last_token_mask: torch.Tensor | None = None

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.backbone.grid_size

    @property
    def num_patches(self) -> int:
        return self.backbone.num_patches

    def _stack_inputs(self, images: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        mods = self.modalities
        unknown = [k for k in images if k not in mods]
        if unknown:
            raise ValueError(f"unknown modality key(s) {unknown}; expected a non-empty subset of {list(mods)}")
        present = [images[m] for m in mods if m in images]
        if not present:
            raise ValueError(f"no input images: pass a dict with some of {list(mods)}")
        reference = present[0]
        for m in mods:
            if m in images and images[m].shape != reference.shape:
                raise ValueError(f"modality '{m}' has shape {tuple(images[m].shape)}, expected {tuple(reference.shape)}")
        return [images[m] if m in images else absent_like(reference) for m in mods]

    def _run(self, images: dict[str, torch.Tensor], cam_ids: torch.Tensor | None, *, all_tokens: bool):
        """Backbone -> SFTS -> HMA. ``all_tokens=False``: only the CLS and selected tokens of the
        backbone output are needed (evaluation), so without gradients the backbone skips the rest."""
        inputs = self._stack_inputs(images)
        batch = inputs[0].shape[0]
        num_mod = len(self.modalities)
        cams = None if cam_ids is None else cam_ids.to(inputs[0].device).repeat(num_mod)

        def select(rollout: torch.Tensor) -> torch.Tensor:  # [M·B, h, N] -> M_U repeated per modality
            return self.sfts(list(rollout.split(batch, dim=0)), inputs).repeat(num_mod, 1)

        # One batch through the shared backbone (no BatchNorm inside: equivalent to three passes).
        out = self.backbone(
            torch.cat(inputs, dim=0),
            cams,
            rollout=self.use_sfts,
            select=select if self.use_sfts and not all_tokens and self.hma is not None else None,
        )
        tokens = dict(zip(self.modalities, out.tokens.split(batch, dim=0)))
        if out.keep is not None:
            mask = out.keep[:batch]
        elif self.use_sfts:
            mask = select(out.rollout)[:batch]
        else:
            mask = torch.ones(batch, self.backbone.num_patches, dtype=torch.bool, device=out.tokens.device)
        self.last_token_mask = mask.detach()
        if self.hma is not None:
            fused = self.hma([tokens[m] for m in self.modalities], mask)
            feature, hma_cls = fused.feature, fused.cls
        else:
            feature, hma_cls = torch.cat([tokens[m][:, 0] for m in self.modalities], dim=-1), None
        return feature, mask, tokens, hma_cls

    def forward_features(self, images: dict[str, torch.Tensor], cam_ids: torch.Tensor | None = None) -> EditorEvalOutput:
        """Retrieval feature (pre-BN f_HMA, [B, M·D]) and the selected-token mask, in any mode."""
        feature, mask, _, _ = self._run(images, cam_ids, all_tokens=False)
        return EditorEvalOutput(feature=feature, token_mask=mask)

    @torch.no_grad()
    def selection_maps(self, images: dict[str, torch.Tensor], cam_ids: torch.Tensor | None = None) -> SelectionMaps:
        """SFTS's inputs and its two masks for a batch (with the configured budgets and tie
        rule), whether or not the model uses SFTS; ``mask`` is the ``token_mask`` of
        :meth:`forward_features` when it does."""
        inputs = self._stack_inputs(images)
        batch = inputs[0].shape[0]
        cams = None if cam_ids is None else cam_ids.to(inputs[0].device).repeat(len(self.modalities))
        rollouts = list(self.backbone(torch.cat(inputs, dim=0), cams, rollout=True).rollout.split(batch, dim=0))
        s = self.sfts
        spatial = spatial_mask(rollouts, s.head_keep, s.ties)
        scores = frequency_scores(inputs, s.patch_size, mode=s.frequency_mode)
        frequency = topk_mask(scores, s.frequency_keep, s.ties)
        return SelectionMaps(torch.stack(rollouts), scores, spatial, frequency, spatial | frequency)

    def forward(self, images: dict[str, torch.Tensor], cam_ids: torch.Tensor | None = None):
        """eval: [B, 3D] feature; train: :class:`EditorTrainOutput`."""
        if not self.training:
            return self.forward_features(images, cam_ids).feature
        feature, mask, tokens, hma_cls = self._run(images, cam_ids, all_tokens=True)
        cls = [tokens[m][:, 0] for m in self.modalities]  # backbone CLS, before SFTS (untouched by it)
        if self.al == 1:
            ori = torch.cat(cls, dim=-1)
            backbone_logits = [self.al_head(self.al_bn(ori))]
            backbone_feats = [ori]
        else:
            backbone_logits = [self.backbone_head(self.backbone_bn(c)) for c in cls]
            backbone_feats = cls
        return EditorTrainOutput(
            fused_logits=self.fuse_head(self.fuse_bn(feature)),
            fused_feat=feature,
            backbone_logits=backbone_logits,
            backbone_feats=backbone_feats,
            backbone_tokens=tokens,
            token_mask=mask,
            hma_cls=hma_cls,
        )


def build_model(cfg, num_classes: int, num_cameras: int, *, pretrained: bool = False) -> EDITOR:
    """EDITOR from a :class:`editor_reid.config.Config`.

    ``num_cameras`` sizes the SIE table (max camera id + 1). With ``pretrained=True`` and a
    non-empty ``cfg.model.pretrain_path`` the backbone weights are loaded from that local file
    (:func:`editor_reid.model.pretrained.load_pretrained`); otherwise nothing is read.
    """
    if tuple(cfg.input.size_train) != tuple(cfg.input.size_test):
        raise ValueError(f"input.size_train {cfg.input.size_train} and input.size_test {cfg.input.size_test} must be equal")
    m = cfg.model
    backbone = build_backbone(m, tuple(cfg.input.size_train), num_cameras)
    model = EDITOR(
        backbone,
        num_classes,
        modalities=cfg.datasets.modalities,
        sfts=m.sfts,
        head_keep=m.head_keep,
        frequency_keep=m.frequency_keep,
        frequency_mode=m.frequency_mode,
        sfts_ties=m.sfts_ties,
        hma=m.hma,
        hma_heads=m.hma_heads,
        al=m.al,
    )
    for module in model.modules():
        if hasattr(module, "fc1") and hasattr(module, "fc2"):  # timm's Mlp and HMA's MaskedMlp
            module.lean = bool(m.lean_mlp)
    if m.grad_checkpointing:
        model.backbone.grad_checkpointing = True
        if model.hma is not None:
            model.hma.grad_checkpointing = True
    if pretrained and m.pretrain_path and m.pretrain_choice != "none":
        load_pretrained(model, m.pretrain_path, m.pretrain_choice)
    return model


def count_parameters(model: nn.Module | None) -> int:
    """Paper-style count: trainable parameters, including the unused backbone ``fc``
    (docs/official-behaviour.md#parameter-count).

    Buffers (BN running statistics) and frozen tensors such as OCFR centres are not counted.
    ``None`` (a part the configuration does not build) counts 0.
    """
    if model is None:
        return 0
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
