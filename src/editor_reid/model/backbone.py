"""Shared ViT backbone: timm's VisionTransformer plus the SIE camera embedding.

The backbone is timm's own ViT definition (``timm.create_model``), so block maths, init and
weight layouts are timm's. What EDITOR adds (spec §1):

* the SIE camera embedding ``sie_embed`` [C, 1, D], added with coefficient ``sie_coe`` to every
  token, CLS included: ``tokens = [CLS; patches] + pos_embed + λ·sie_embed[cam]``;
* the unused classifier ``fc`` (D -> 1000) that the official model builds; it is kept so the
  parameter count and official checkpoints match, and never used in ``forward``;
* the post-softmax attention probabilities of every block, which SFTS needs and timm's fused
  attention does not expose. They are recomputed from the block's own q/k (captured from the
  block's ``attn.qkv`` output), under ``torch.no_grad`` and in fp32, while the block output comes
  from timm's fused path; the maps are therefore never part of the autograd graph.

By default the maps are not kept: the per-head attention product ``R = A_l ··· A_1`` is
accumulated block by block (one [B, h, L, L] fp32 buffer whatever the depth) and only the CLS
row over the patches, ``R[:, :, 0, 1:]``, is returned. ``return_attn=True`` also returns the
list of maps (tests, visualisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import timm
import torch
from torch import nn

__all__ = ["ARCHITECTURES", "BackboneOutput", "ViTBackbone", "build_backbone"]

# transformer_type -> (timm model name, extra kwargs). Every entry is a timm ViT definition;
# embed_dim / depth / num_heads can be overridden for tiny test models.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    # ImageNet ViT-B/16 as TransReID/EDITOR: qkv bias, LayerNorm eps 1e-6, GELU.
    "vit_base_patch16_224": ("vit_base_patch16_224", {}),
    "deit_base_patch16_224": ("vit_base_patch16_224", {}),  # the official factory maps it to ViT-B
    "deit_small_patch16_224": ("vit_small_patch16_224", {}),  # width 384, 12 layers, 6 heads
    # OpenAI CLIP ViT-B/16 image tower: pre-norm, LayerNorm eps 1e-5, quick_gelu, no patch bias.
    "vit_base_patch16_clip_224": ("vit_base_patch16_clip_quickgelu_224", {}),
    # Tiny ImageNet-style ViT for tests and the CPU demo.
    "vit_tiny_test": ("vit_base_patch16_224", {"embed_dim": 64, "depth": 2, "num_heads": 4}),
}

PATCH_SIZE = 16
FC_CLASSES = 1000  # the official backbone's unused ImageNet classifier


@dataclass
class BackboneOutput:
    tokens: torch.Tensor  # [B, 1+N, D] after the final LayerNorm
    rollout: torch.Tensor | None  # [B, h, N] CLS row (without the CLS column) of A_L···A_1, fp32
    attn: list[torch.Tensor] | None  # per block [B, h, 1+N, 1+N] post-softmax, fp32, detached


def rollout_cls_row(attn: list[torch.Tensor]) -> torch.Tensor:
    """CLS row of the per-head product ``A_L ··· A_1`` without the CLS column: [B, h, N].

    Computed as a chain of vector-matrix products, ``r = e_0ᵀ A_L``, then ``r = r A_{L-1}``, ...,
    down to ``A_1``, which is exact and costs O(L²) per map instead of O(L³).
    """
    row = attn[-1][:, :, :1, :]  # [B, h, 1, L] = e_0ᵀ A_L
    for a in reversed(attn[:-1]):
        row = row @ a
    return row[:, :, 0, 1:]


class ViTBackbone(nn.Module):
    """timm ViT shared by the modalities, with SIE and attention-probability capture.

    Args:
        transformer_type: key of :data:`ARCHITECTURES`.
        img_size: (H, W) of the input, multiples of 16.
        num_cameras: SIE table size (max camera id + 1); SIE is built only if ``sie_camera`` and
            ``num_cameras > 1``.
        embed_dim / depth / num_heads: overrides (0 = architecture default).
    """

    def __init__(
        self,
        transformer_type: str = "vit_base_patch16_224",
        img_size: tuple[int, int] = (256, 128),
        *,
        stride_size: tuple[int, int] | list[int] = (16, 16),
        num_cameras: int = 0,
        sie_camera: bool = True,
        sie_coe: float = 3.0,
        embed_dim: int = 0,
        depth: int = 0,
        num_heads: int = 0,
        drop_path: float = 0.1,
        drop_out: float = 0.0,
        att_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if transformer_type not in ARCHITECTURES:
            raise ValueError(
                f"model.transformer_type '{transformer_type}' is not supported; choose one of {', '.join(ARCHITECTURES)}"
            )
        if tuple(stride_size) != (PATCH_SIZE, PATCH_SIZE):
            raise ValueError(
                f"model.stride_size {list(stride_size)} is not supported: only non-overlapping 16x16 patches "
                "(stride [16, 16], as in every official config) are implemented"
            )
        height, width = int(img_size[0]), int(img_size[1])
        if height % PATCH_SIZE or width % PATCH_SIZE or height <= 0 or width <= 0:
            raise ValueError(f"input size {height}x{width} must be positive multiples of {PATCH_SIZE} (H x W)")
        timm_name, arch_kwargs = ARCHITECTURES[transformer_type]
        kwargs = dict(arch_kwargs)
        for key, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if value:
                kwargs[key] = value
        if "num_heads" in kwargs and "embed_dim" in kwargs and kwargs["embed_dim"] % kwargs["num_heads"]:
            raise ValueError(
                f"model.embed_dim {kwargs['embed_dim']} is not divisible by model.num_heads {kwargs['num_heads']}"
            )
        self.transformer_type = transformer_type
        self.timm_name = timm_name
        self.vit = timm.create_model(
            timm_name,
            pretrained=False,
            img_size=(height, width),
            num_classes=0,
            drop_path_rate=drop_path,
            pos_drop_rate=drop_out,
            proj_drop_rate=drop_out,
            attn_drop_rate=att_drop_rate,
            **kwargs,
        )
        self.embed_dim = self.vit.embed_dim
        self.num_heads = self.vit.blocks[0].attn.num_heads
        self.depth = len(self.vit.blocks)
        self.grid_size = tuple(self.vit.patch_embed.grid_size)  # (rows, cols)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.img_size = (height, width)
        self.sie_coe = float(sie_coe)
        self.num_cameras = int(num_cameras)
        if sie_camera and num_cameras > 1:
            self.sie_embed = nn.Parameter(torch.zeros(num_cameras, 1, self.embed_dim))
            nn.init.trunc_normal_(self.sie_embed, std=0.02)
        else:
            self.sie_embed = None
        self.fc = nn.Linear(self.embed_dim, FC_CLASSES)  # unused, see module docstring
        # q/k capture: each block's qkv output is stashed (detached) while a forward runs.
        self._qkv: list[torch.Tensor | None] = [None] * self.depth
        self._capturing = False
        for index, block in enumerate(self.vit.blocks):
            block.attn.qkv.register_forward_hook(partial(self._stash_qkv, index))

    def _stash_qkv(self, index: int, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if self._capturing:
            self._qkv[index] = output.detach()

    def _attention_probs(self, block: nn.Module, qkv: torch.Tensor) -> torch.Tensor:
        """softmax(q kᵀ · scale) of one block from its captured qkv output: [B, h, L, L] fp32."""
        attn = block.attn
        batch, length, _ = qkv.shape
        qkv = qkv.float().reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        return torch.softmax((q * attn.scale) @ k.transpose(-2, -1), dim=-1)

    def embed(self, images: torch.Tensor, cam_ids: torch.Tensor | None) -> torch.Tensor:
        """Patchify, prepend CLS, add position and SIE terms: [B, 1+N, D]."""
        vit = self.vit
        x = vit.patch_embed(images)  # [B, N, D]
        x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
        if self.sie_embed is not None:
            if cam_ids is None:
                raise ValueError("the SIE camera embedding is enabled (model.sie_camera): pass the camera ids")
            x = x + self.sie_coe * self.sie_embed[cam_ids.to(device=x.device, dtype=torch.long)]
        return vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))

    def check_cameras(self, cam_ids: torch.Tensor | None) -> None:
        if self.sie_embed is None or cam_ids is None or cam_ids.numel() == 0:
            return
        low, high = int(cam_ids.min()), int(cam_ids.max())
        if low < 0 or high >= self.num_cameras:
            raise ValueError(
                f"camera id out of range [{low}, {high}]: the SIE table has {self.num_cameras} cameras "
                "(build the model with num_cameras = max camera id + 1)"
            )

    def forward(
        self,
        images: torch.Tensor,
        cam_ids: torch.Tensor | None = None,
        *,
        rollout: bool = True,
        return_attn: bool = False,
    ) -> BackboneOutput:
        """images [B, 3, H, W], cam_ids [B] -> :class:`BackboneOutput`.

        ``rollout``: accumulate the per-head attention product and return its CLS row.
        ``return_attn``: also return every block's attention probabilities.
        """
        expected = (images.shape[-2], images.shape[-1])
        if expected != self.img_size:
            raise ValueError(
                f"input size {expected[0]}x{expected[1]} differs from the model's {self.img_size[0]}x{self.img_size[1]}"
            )
        self.check_cameras(cam_ids)
        x = self.embed(images, cam_ids)
        need_probs = rollout or return_attn
        product: torch.Tensor | None = None
        maps: list[torch.Tensor] = []
        self._capturing = need_probs
        try:
            for index, block in enumerate(self.vit.blocks):
                x = block(x)
                if not need_probs:
                    continue
                qkv, self._qkv[index] = self._qkv[index], None
                with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
                    probs = self._attention_probs(block, qkv)
                    if return_attn:
                        maps.append(probs)
                    if rollout:
                        product = probs if product is None else probs @ product
        finally:
            self._capturing = False
            self._qkv = [None] * self.depth
        tokens = self.vit.norm(x)
        row = product[:, :, 0, 1:] if product is not None else None
        return BackboneOutput(tokens=tokens, rollout=row, attn=maps if return_attn else None)


def build_backbone(model_cfg, img_size: tuple[int, int], num_cameras: int) -> ViTBackbone:
    """Backbone from ``cfg.model`` (see :class:`editor_reid.config.ModelConfig`)."""
    return ViTBackbone(
        model_cfg.transformer_type,
        img_size,
        stride_size=model_cfg.stride_size,
        num_cameras=num_cameras,
        sie_camera=model_cfg.sie_camera,
        sie_coe=model_cfg.sie_coe,
        embed_dim=model_cfg.embed_dim,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        drop_path=model_cfg.drop_path,
        drop_out=model_cfg.drop_out,
        att_drop_rate=model_cfg.att_drop_rate,
    )
