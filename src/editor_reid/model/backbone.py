"""Shared ViT backbone: timm's VisionTransformer plus the SIE camera embedding.

The backbone is timm's own ViT definition (``timm.create_model``), so block maths, init and
weight layouts are timm's; every timm internal read here goes through ``model/_timm.py``.
What EDITOR adds (docs/official-behaviour.md#backbone):

* the SIE camera embedding ``sie_embed`` [C, 1, D], added with coefficient ``sie_coe`` to every
  token, CLS included: ``tokens = [CLS; patches] + pos_embed + λ·sie_embed[cam]``. Camera id
  :data:`UNKNOWN_CAMERA` (-1), for a camera the model was not trained on, takes the mean of the
  C learned embeddings instead (see :meth:`ViTBackbone.embed` for why). ``sie_tokens="cls"``
  adds it to the class token only, as the CLIP ReID models (CLIP-ReID, DeMo, IDEA, MDReID) do
  (docs/clip.md);
* the unused classifier ``fc`` (D -> 1000) that the official model builds; it is kept so the
  parameter count and official checkpoints match, and never used in ``forward``;
* the post-softmax attention probabilities of every block, which SFTS needs and timm's fused
  attention does not expose. They are fp32 and never part of the autograd graph.

How the probabilities are obtained depends on the grad mode:

* with gradients (training): the blocks run timm's forward (fused attention, so no [L, L] map is
  saved for backward); each block's ``attn.qkv`` output is captured by a forward hook
  (detached: it shares storage with the q/k/v that attention saves for backward anyway), and
  after the last block the maps are recomputed from it under ``no_grad``, one at a time;
* without gradients (inference): the blocks run the same maths with the attention written out,
  ``softmax(q kᵀ·scale)·v``, so each map is computed once, used for the block output and kept.

Only the CLS row of the per-head product ``R = A_L ··· A_1`` is needed, so it is computed as the
vector-matrix chain ``e_0ᵀ A_L A_{L-1} ··· A_1`` (O(L·N²) per head instead of O(L·N³)), which
needs the maps in reverse order: the CLS row of ``A_L``, then every other map.

Inference with ``select`` (EDITOR's evaluation path): once the rollout row is known after the
last block's attention probabilities, ``select`` returns the kept tokens and the rest of the
last block (queries, attention output, MLP) and the final LayerNorm run on the kept tokens only
(CLS + selected patches; keys and values still cover every token). The other positions of the
returned tokens are zero: nothing downstream of the selection reads them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from editor_reid.errors import UsageError
from editor_reid.model import _timm

__all__ = [
    "ARCHITECTURES",
    "UNKNOWN_CAMERA",
    "BackboneConfigError",
    "BackboneOutput",
    "SIE_TOKENS",
    "ViTBackbone",
    "attention_probs",
    "attention_with_probs",
    "build_backbone",
    "rollout_cls_row",
]

# transformer_type -> (timm model name, extra kwargs). Every entry is a timm ViT definition;
# embed_dim / depth / num_heads can be overridden for tiny test models.
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    # ImageNet ViT-B/16 as TransReID/EDITOR: qkv bias, LayerNorm eps 1e-6, GELU.
    "vit_base_patch16_224": ("vit_base_patch16_224", {}),
    "deit_base_patch16_224": ("vit_base_patch16_224", {}),  # the official factory maps it to ViT-B
    "deit_small_patch16_224": ("vit_small_patch16_224", {}),  # width 384, 12 layers, 6 heads
    # OpenAI CLIP ViT-B/16 image tower: pre-norm, LayerNorm eps 1e-5, quick_gelu, no patch bias.
    "vit_base_patch16_clip_224": ("vit_base_patch16_clip_quickgelu_224", {}),
    # The same tower with exact GELU, for open_clip weights trained without QuickGELU (the LAION /
    # DataComp ViT-B-16 tags); the file cannot tell which activation it was trained with.
    "vit_base_patch16_clip_gelu_224": ("vit_base_patch16_clip_224", {}),
    # Tiny ImageNet-style ViT for tests and the CPU demo.
    "vit_tiny_test": ("vit_base_patch16_224", {"embed_dim": 64, "depth": 2, "num_heads": 4}),
}

PATCH_SIZE = 16
#: The camera id of a camera outside the SIE table (a new deployment camera): its SIE term is the
#: mean of the learned camera embeddings.
UNKNOWN_CAMERA = -1
FC_CLASSES = 1000  # the official backbone's unused ImageNet classifier


@dataclass
class BackboneOutput:
    tokens: torch.Tensor  # [B, 1+N, D] after the final LayerNorm
    rollout: torch.Tensor | None  # [B, h, N] CLS row (without the CLS column) of A_L···A_1, fp32
    attn: list[torch.Tensor] | None  # per block [B, h, 1+N, 1+N] post-softmax, fp32, detached
    keep: torch.Tensor | None = None  # [B, N] bool from ``select`` (None without it)


def rollout_cls_row(attn: list[torch.Tensor]) -> torch.Tensor:
    """CLS row of the per-head product ``A_L ··· A_1`` without the CLS column: [B, h, N].

    Computed as a chain of vector-matrix products, ``r = e_0ᵀ A_L``, then ``r = r A_{L-1}``, ...,
    down to ``A_1``, which is exact and costs O(L²) per map instead of O(L³).
    """
    row = attn[-1][:, :, :1, :]  # [B, h, 1, L] = e_0ᵀ A_L
    for a in reversed(attn[:-1]):
        row = row @ a
    return row[:, :, 0, 1:]


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) in fp32: q [B, h, Lq, d], k [B, h, L, d] -> [B, h, Lq, L].

    One batched matmul (scale folded in) and one in-place softmax: few large kernels rather than
    many small ones (each parallel kernel has a fixed cost, large on a busy machine). ``out``: a
    contiguous fp32 [B, h, Lq, L] tensor to write into (no allocation).
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        batch, heads, length_q, dim = q.shape
        length = k.shape[2]
        q = q.float().reshape(batch * heads, length_q, dim)
        k = k.float().reshape(batch * heads, length, dim)
        if out is None:
            out = q.new_empty(batch, heads, length_q, length)
        logits = out.view(batch * heads, length_q, length)
        torch.baddbmm(logits, q, k.transpose(1, 2), beta=0.0, alpha=scale, out=logits)
        torch.softmax(logits, dim=-1, out=logits)
        return out


def attention_with_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    dropout: nn.Module | None = None,
    probs_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out, fp32: q [B, h, Lq, d], k, v [B, h, L, d] -> (output [B, Lq, h, d],
    probs [B, h, Lq, L]). ``dropout`` (the block's ``attn_drop``) acts on the output path only;
    ``probs_out`` as ``out`` of :func:`attention_probs`."""
    probs = attention_probs(q, k, scale, out=probs_out)
    weights = probs if dropout is None else dropout(probs)
    batch, heads, length_q, length = probs.shape
    with torch.autocast(device_type=q.device.type, enabled=False):
        v = v.float().reshape(batch * heads, length, -1)
        out = torch.bmm(weights.reshape(batch * heads, length_q, length), v)
    return out.view(batch, heads, length_q, -1).transpose(1, 2), probs


def _heads_first(x: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    """[B, L, parts·h·d] -> [parts, B, h, L, d], one contiguous copy."""
    batch, length, width = x.shape
    return x.view(batch, length, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4).contiguous()


class BackboneConfigError(UsageError, ValueError):
    """A model.* setting the backbone cannot be built with (exit status 2 on the command line)."""


#: model.sie_tokens: the tokens the SIE camera embedding is added to.
SIE_TOKENS = ("all", "cls")

# Heads of each timm definition when model.num_heads does not override them.
_DEFAULT_HEADS = {
    "vit_base_patch16_224": 12,
    "vit_small_patch16_224": 6,
    "vit_base_patch16_clip_quickgelu_224": 12,
    "vit_base_patch16_clip_224": 12,
}


def _timm_arguments(
    transformer_type: str, stride_size, img_size: tuple[int, int], embed_dim: int, depth: int, num_heads: int
) -> tuple[str, dict]:
    """Validated (timm model name, size overrides) for :class:`ViTBackbone`."""
    if transformer_type not in ARCHITECTURES:
        raise BackboneConfigError(
            f"model.transformer_type '{transformer_type}' is not supported; choose one of {', '.join(ARCHITECTURES)}"
        )
    if tuple(stride_size) != (PATCH_SIZE, PATCH_SIZE):
        raise BackboneConfigError(
            f"model.stride_size {list(stride_size)} is not supported: only non-overlapping 16x16 patches "
            "(stride [16, 16], as in every official config) are implemented"
        )
    height, width = img_size
    if height % PATCH_SIZE or width % PATCH_SIZE or height <= 0 or width <= 0:
        raise BackboneConfigError(f"input size {height}x{width} must be positive multiples of {PATCH_SIZE} (H x W)")
    timm_name, arch_kwargs = ARCHITECTURES[transformer_type]
    kwargs = dict(arch_kwargs)
    for key, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
        if value:
            kwargs[key] = value
    heads = kwargs.get("num_heads", _DEFAULT_HEADS.get(timm_name))
    if "embed_dim" in kwargs and heads and kwargs["embed_dim"] % heads:
        source = "model.num_heads" if "num_heads" in kwargs else f"the {heads} heads of {transformer_type}"
        raise BackboneConfigError(f"model.embed_dim {kwargs['embed_dim']} is not divisible by {source} {heads}"
                                  if "num_heads" in kwargs else
                                  f"model.embed_dim {kwargs['embed_dim']} is not divisible by {source}; "
                                  "set model.num_heads too")
    return timm_name, kwargs


class ViTBackbone(nn.Module):
    """timm ViT shared by the modalities, with SIE and attention-probability capture.

    Args:
        transformer_type: key of :data:`ARCHITECTURES`.
        img_size: (H, W) of the input, multiples of 16.
        num_cameras: SIE table size (max camera id + 1); SIE is built only if ``sie_camera`` and
            ``num_cameras > 1``.
        sie_tokens: "all" (EDITOR) or "cls" (the CLIP ReID models): the tokens SIE is added to.
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
        sie_tokens: str = "all",
        embed_dim: int = 0,
        depth: int = 0,
        num_heads: int = 0,
        drop_path: float = 0.1,
        drop_out: float = 0.0,
        att_drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        height, width = int(img_size[0]), int(img_size[1])
        timm_name, kwargs = _timm_arguments(transformer_type, stride_size, (height, width), embed_dim, depth, num_heads)
        if sie_tokens not in SIE_TOKENS:
            raise BackboneConfigError(f"model.sie_tokens '{sie_tokens}' is not one of {', '.join(SIE_TOKENS)}")
        self.sie_tokens = sie_tokens
        self.transformer_type = transformer_type
        self.timm_name = timm_name
        self.vit = _timm.create_vit(  # checks the timm internals this module relies on
            timm_name,
            img_size=(height, width),
            num_classes=0,
            drop_path_rate=drop_path,
            pos_drop_rate=drop_out,
            proj_drop_rate=drop_out,
            attn_drop_rate=att_drop_rate,
            **kwargs,
        )
        blocks = _timm.blocks(self.vit)
        self.embed_dim = _timm.embed_dim(self.vit)
        self.num_heads = _timm.attention_parts(blocks[0]).num_heads
        self.depth = len(blocks)
        self.grid_size = _timm.grid_size(self.vit)  # (rows, cols)
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
        # Grad path: each block's qkv output is stashed (detached) while a forward runs.
        self._qkv: list[torch.Tensor | None] = [None] * self.depth
        self._capturing = False
        #: Activation checkpointing of the blocks in training (``model.grad_checkpointing``): each
        #: block is recomputed in the backward pass instead of keeping its activations.
        self.grad_checkpointing = False
        for index, block in enumerate(blocks):
            _timm.qkv_layer(block).register_forward_hook(partial(self._stash_qkv, index))

    def _stash_qkv(self, index: int, module: nn.Module, inputs, output: torch.Tensor) -> None:
        if self._capturing:
            self._qkv[index] = output.detach()

    @staticmethod
    def _block_with_probs(block: nn.Module, x: torch.Tensor, probs_out: torch.Tensor) -> torch.Tensor:
        """One block with its attention written out (no-grad path): output [B, L, D]; the
        probabilities are written into ``probs_out`` [B, h, L, L] (see ``_forward_written_out``)."""
        attn = _timm.attention_parts(block)
        h = attn.norm1(x)
        q, k, v = _heads_first(attn.qkv(h), 3, attn.num_heads).unbind(0)  # [B, h, L, d] each
        out, _ = attention_with_probs(attn.q_norm(q), attn.k_norm(k), v, attn.scale, attn.attn_drop, probs_out)
        return _timm.finish_block(block, x, h, out)

    def _last_block_selected(
        self, block: nn.Module, x: torch.Tensor, maps: list[torch.Tensor], select
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Last block when only the selected tokens are needed (no-grad path).

        Keys/values for every token and the CLS query give ``e_0ᵀ A_L``; the rollout row, then
        ``select``, follow; queries, attention output, MLP and the final LayerNorm then run on the
        kept rows only. Returns (tokens [B, L, D], zero at dropped positions; row [B, h, N]; keep).
        """
        attn = _timm.attention_parts(block)
        batch, length, dim = x.shape
        h = attn.norm1(x)
        weight, bias = attn.qkv.weight, attn.qkv.bias
        kv = F.linear(h, weight[dim:], None if bias is None else bias[dim:])  # [B, L, 2D]
        k, v = _heads_first(kv, 2, attn.num_heads).unbind(0)  # [B, h, L, d]
        k = attn.k_norm(k)

        def queries(rows: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
            return F.linear(rows, weight[:dim], None if bias is None else bias[:dim])

        q_cls = attn.q_norm(_heads_first(queries(h[:, :1]), 1, attn.num_heads)[0])  # [B, h, 1, d]
        row = rollout_cls_row(maps + [attention_probs(q_cls, k, attn.scale)])  # [B, h, N]
        keep = select(row)  # [B, N] bool
        keep_all = torch.cat([keep.new_ones(batch, 1), keep], dim=1)  # [B, L]
        counts = keep_all.sum(dim=1)
        padded, total = torch.stack([counts.max(), counts.sum()]).tolist()  # the one host sync
        # Kept rows packed [T, D] for the row-wise work; attention on a per-sequence padded layout.
        rows = torch.nonzero_static(keep_all.flatten(), size=total).squeeze(1)  # [T]
        seq = rows // length
        rank = keep_all.cumsum(dim=1).flatten()[rows] - 1  # position among the kept rows of its sequence
        x_rows, h_rows = x.reshape(-1, dim)[rows], h.reshape(-1, dim)[rows]
        q = kv.new_zeros(batch, padded, dim)
        q[seq, rank] = queries(h_rows)
        q = attn.q_norm(_heads_first(q, 1, attn.num_heads)[0])  # [B, h, Lq, d]
        out, _ = attention_with_probs(q, k, v, attn.scale, attn.attn_drop)  # [B, Lq, h, d]
        kept = _timm.final_norm(self.vit, _timm.finish_block(block, x_rows, h_rows, out[seq, rank]))
        tokens = kept.new_zeros(batch * length, kept.shape[-1]).index_copy_(0, rows, kept)
        return tokens.reshape(batch, length, -1), row, keep

    def embed(self, images: torch.Tensor, cam_ids: torch.Tensor | None) -> torch.Tensor:
        """Patchify, prepend CLS, add position and SIE terms: [B, 1+N, D].

        Camera id :data:`UNKNOWN_CAMERA` (-1) adds ``sie_coe`` times the mean of the learned
        camera embeddings. In training every token carried one camera's embedding, so the
        network never saw a token without a camera offset; zero would shift every token of an
        unseen camera away from anything it was trained on, by the whole length of the offset.
        The mean is the expected offset over the table's cameras (uniformly weighted: the table
        does not know how often each camera appeared): the smallest average shift from the
        cameras the network knows. Known ids index the table exactly as before.
        """
        sie = None
        if self.sie_embed is not None:
            if cam_ids is None:
                raise ValueError("the SIE camera embedding is enabled (model.sie_camera): pass the camera ids")
            cams = cam_ids.to(device=self.sie_embed.device, dtype=torch.long)
            # Row C of the extended table is the mean; -1 is sent there without a host sync.
            table = torch.cat([self.sie_embed, self.sie_embed.mean(dim=0, keepdim=True)])  # [C+1, 1, D]
            sie = self.sie_coe * table[torch.where(cams == UNKNOWN_CAMERA, self.num_cameras, cams)]  # [B, 1, D]
            if self.sie_tokens == "cls":
                sie = F.pad(sie, (0, 0, 0, self.num_patches))  # [B, 1+N, D], zero on the patches
        return _timm.embed_tokens(self.vit, images, sie)

    def check_cameras(self, cam_ids: torch.Tensor | None) -> None:
        """Raise ValueError when a camera id is neither in the SIE table nor :data:`UNKNOWN_CAMERA`."""
        if self.sie_embed is None or cam_ids is None or cam_ids.numel() == 0:
            return
        if cam_ids.device.type != "cpu":  # a readable error would cost a host sync per batch
            in_range = (cam_ids.min() >= UNKNOWN_CAMERA) & (cam_ids.max() < self.num_cameras)
            torch._assert_async(in_range, "camera id out of range for the SIE table (num_cameras = max camera id + 1; "
                                          "-1 = unknown camera)")
            return
        low, high = int(cam_ids.min()), int(cam_ids.max())
        if low < UNKNOWN_CAMERA or high >= self.num_cameras:
            raise ValueError(
                f"camera id out of range [{low}, {high}]: the SIE table has {self.num_cameras} cameras "
                f"(ids 0..{self.num_cameras - 1}, or {UNKNOWN_CAMERA} for an unknown camera; build the model with "
                "num_cameras = max camera id + 1)"
            )

    def forward(
        self,
        images: torch.Tensor,
        cam_ids: torch.Tensor | None = None,
        *,
        rollout: bool = True,
        return_attn: bool = False,
        select: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> BackboneOutput:
        """images [B, 3, H, W], cam_ids [B] -> :class:`BackboneOutput`.

        ``rollout``: return the CLS row of the per-head attention product.
        ``return_attn``: also return every block's attention probabilities.
        ``select``: rollout row [B, h, N] -> kept patches [B, N] bool. Without gradients, the
        tokens at dropped positions are then not computed (zero); with gradients every token is
        computed as usual. The mask is returned as ``keep``.
        """
        expected = (images.shape[-2], images.shape[-1])
        if expected != self.img_size:
            raise ValueError(
                f"input size {expected[0]}x{expected[1]} differs from the model's {self.img_size[0]}x{self.img_size[1]}"
            )
        self.check_cameras(cam_ids)
        x = self.embed(images, cam_ids)
        if not (rollout or return_attn or select is not None):
            tokens = _timm.final_norm(self.vit, _timm.run_blocks(self.vit, x, checkpoint=self.grad_checkpointing))
            return BackboneOutput(tokens=tokens, rollout=None, attn=None)
        if torch.is_grad_enabled():
            tokens, maps, row = self._forward_captured(x, return_attn)
            keep = select(row) if select is not None else None
        else:
            tokens, maps, row, keep = self._forward_written_out(x, return_attn, select)
        return BackboneOutput(
            tokens=tokens, rollout=row if rollout else None, attn=maps if return_attn else None, keep=keep
        )

    def _forward_captured(self, x: torch.Tensor, return_attn: bool):
        """Grad path: timm blocks (fused attention), maps recomputed afterwards from captured qkv."""
        self._capturing = True
        try:
            tokens = _timm.final_norm(self.vit, _timm.run_blocks(self.vit, x, checkpoint=self.grad_checkpointing))
            with torch.no_grad():
                blocks = _timm.blocks(self.vit)

                def probs(index: int, queries: slice = slice(None)) -> torch.Tensor:  # [B, h, Lq, L]
                    attn = _timm.attention_parts(blocks[index])
                    qkv = self._qkv[index].unflatten(-1, (3, attn.num_heads, -1))[:, :, :2]
                    q, k = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, L, d] views
                    return attention_probs(attn.q_norm(q[:, :, queries]), attn.k_norm(k), attn.scale)

                if return_attn:
                    maps = [probs(index) for index in range(len(blocks))]
                    return tokens, maps, rollout_cls_row(maps)
                # Reverse chain, one map alive at a time: e_0ᵀ A_L, then · A_{L-1}, ..., · A_1.
                row = probs(len(blocks) - 1, slice(0, 1))  # [B, h, 1, L]
                for index in reversed(range(len(blocks) - 1)):
                    row = row @ probs(index)
                return tokens, None, row[:, :, 0, 1:]
        finally:
            self._capturing = False
            self._qkv = [None] * self.depth

    def _forward_written_out(self, x: torch.Tensor, return_attn: bool, select):
        """No-grad path: attention written out, each map computed once and kept (fp32).

        The maps are written into one buffer allocated before the first block: allocating each
        kept map as it comes interleaves long-lived blocks with the blocks' temporaries, so the
        allocator cannot reuse their memory and the later blocks run on fresh pages (on CPU the
        page faults made some MLP activations 10-20x slower than in the bare backbone).
        """
        blocks = _timm.blocks(self.vit)
        early_select = select is not None and not return_attn
        written = blocks[:-1] if early_select else blocks
        batch, length, _ = x.shape
        buffer = x.new_empty(len(written), batch, self.num_heads, length, length, dtype=torch.float32)
        maps: list[torch.Tensor] = list(buffer.unbind(0))  # [B, h, L, L] each
        for block, probs in zip(written, maps):
            x = self._block_with_probs(block, x, probs)
        if early_select:
            tokens, row, keep = self._last_block_selected(blocks[-1], x, maps, select)
            return tokens, None, row, keep
        row = rollout_cls_row(maps)
        keep = select(row) if select is not None else None
        return _timm.final_norm(self.vit, x), maps, row, keep


def build_backbone(model_cfg, img_size: tuple[int, int], num_cameras: int) -> ViTBackbone:
    """Backbone from ``cfg.model`` (see :class:`editor_reid.config.ModelConfig`)."""
    return ViTBackbone(
        model_cfg.transformer_type,
        img_size,
        stride_size=model_cfg.stride_size,
        num_cameras=num_cameras,
        sie_camera=model_cfg.sie_camera,
        sie_coe=model_cfg.sie_coe,
        sie_tokens=model_cfg.sie_tokens,
        embed_dim=model_cfg.embed_dim,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        drop_path=model_cfg.drop_path,
        drop_out=model_cfg.drop_out,
        att_drop_rate=model_cfg.att_drop_rate,
    )
