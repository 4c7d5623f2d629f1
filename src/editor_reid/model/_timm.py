"""The one place that knows timm's internals.

The backbone runs timm's ViT blocks piece by piece (to write the attention out, and to run the
last block on the kept tokens only), and the pretrained loader reuses timm's private checkpoint
converters. timm does not promise to keep those attributes and functions, so they are named here
and nowhere else, and :func:`check_vit` verifies all of them once when the backbone is built: a
timm release that renames one fails at construction with a message naming it, not mid-forward
or with a silently different computation.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.utils.checkpoint
from torch import nn

from editor_reid.errors import EditorReidError
from editor_reid.model._mlp import gelu_mlp

__all__ = [
    "TESTED_TIMM",
    "AttentionParts",
    "UnsupportedTimmError",
    "attention_parts",
    "blocks",
    "check_vit",
    "convert_openai_clip",
    "create_vit",
    "embed_dim",
    "embed_tokens",
    "final_norm",
    "finish_block",
    "grid_size",
    "load_npz_weights",
    "qkv_layer",
    "run_blocks",
    "mlp_forward",
    "block_forward",
]

TESTED_TIMM = "timm~=1.0.31"  # the range pinned in pyproject.toml

# Attribute paths read on timm's VisionTransformer and on each of its Blocks.
_VIT_ATTRIBUTES = (
    "embed_dim",
    "blocks",
    "patch_embed",
    "patch_embed.grid_size",
    "cls_token",
    "pos_embed",
    "pos_drop",
    "patch_drop",
    "norm_pre",
    "norm",
)
_BLOCK_ATTRIBUTES = (
    "norm1",
    "attn",
    "attn.qkv",
    "attn.num_heads",
    "attn.scale",
    "attn.q_norm",
    "attn.k_norm",
    "attn.attn_drop",
    "attn.norm",
    "attn.gate",  # None unless the block is gated, but present
    "attn.proj",
    "attn.proj_drop",
    "ls1",
    "drop_path1",
    "norm2",
    "mlp",
    "ls2",
    "drop_path2",
)
_VIT_MODULE = "timm.models.vision_transformer"
_FUNCTIONS = ("_load_weights", "_convert_openai_clip")


class UnsupportedTimmError(EditorReidError, RuntimeError):
    """The installed timm lacks an internal the backbone or the pretrained loader relies on."""


def _unsupported(missing: list[str]) -> UnsupportedTimmError:
    return UnsupportedTimmError(
        f"timm {timm.__version__} is not supported: missing {', '.join(missing)}. editor_reid uses these timm "
        f"internals and is tested with {TESTED_TIMM}; install a timm in that range (pip install '{TESTED_TIMM}')"
    )


def _has_path(obj: object, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(obj, name):
            return False
        obj = getattr(obj, name)
    return True


def _function(name: str):
    function = getattr(importlib.import_module(_VIT_MODULE), name, None)
    if function is None:
        raise _unsupported([f"function {_VIT_MODULE}.{name}"])
    return function


def check_vit(vit: nn.Module) -> None:
    """Raise :class:`UnsupportedTimmError` naming every timm internal ``vit`` or timm lacks."""
    missing = [f"VisionTransformer attribute '{path}'" for path in _VIT_ATTRIBUTES if not _has_path(vit, path)]
    for index, block in enumerate(vit.blocks if _has_path(vit, "blocks") else ()):
        missing += [f"blocks[{index}] attribute '{path}'" for path in _BLOCK_ATTRIBUTES if not _has_path(block, path)]
        if _has_path(block, "attn.qkv") and not isinstance(block.attn.qkv, nn.Linear):
            missing.append(f"blocks[{index}].attn.qkv as an nn.Linear (found {type(block.attn.qkv).__name__})")
    vit_module = importlib.import_module(_VIT_MODULE)
    missing += [f"function {_VIT_MODULE}.{name}" for name in _FUNCTIONS if not hasattr(vit_module, name)]
    if missing:
        raise _unsupported(missing)


def create_vit(name: str, **kwargs) -> nn.Module:
    """A randomly initialised timm ViT, checked with :func:`check_vit`."""
    vit = timm.create_model(name, pretrained=False, **kwargs)
    check_vit(vit)
    return vit


# ----------------------------------------------------------------------------- model accessors


def blocks(vit: nn.Module) -> list[nn.Module]:
    return list(vit.blocks)


def embed_dim(vit: nn.Module) -> int:
    return int(vit.embed_dim)


def grid_size(vit: nn.Module) -> tuple[int, int]:
    """Patch grid (rows, cols)."""
    return tuple(vit.patch_embed.grid_size)


def qkv_layer(block: nn.Module) -> nn.Linear:
    """The block's fused q/k/v projection: [.., D] -> [.., 3D], q, k, v in that order."""
    return block.attn.qkv


@dataclass(frozen=True)
class AttentionParts:
    """What written-out attention needs from one timm Block: h = norm1(x), then
    q, k, v = qkv(h) split into heads; probabilities softmax(q_norm(q) k_norm(k)ᵀ · scale)."""

    norm1: nn.Module
    qkv: nn.Linear
    num_heads: int
    scale: float
    q_norm: nn.Module
    k_norm: nn.Module
    attn_drop: nn.Module


def attention_parts(block: nn.Module) -> AttentionParts:
    attn = block.attn
    return AttentionParts(block.norm1, attn.qkv, attn.num_heads, attn.scale, attn.q_norm, attn.k_norm, attn.attn_drop)


def finish_block(block: nn.Module, x: torch.Tensor, h: torch.Tensor, heads_out: torch.Tensor) -> torch.Tensor:
    """Rest of a timm ``Block`` after attention: merge heads, proj, residuals, MLP.

    x: block input rows [..., D]; h: their ``norm1`` output (timm's optional gate reads it);
    heads_out: attention output [..., h, d] for the same rows. Same operations, in the same
    order, as timm's ``Attention.forward`` tail and ``Block.forward``.
    """
    attn = block.attn
    out = attn.norm(heads_out.flatten(-2).to(x.dtype))
    if attn.gate is not None:
        out = out * attn.gate(h).sigmoid()
    x = x + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    return x + block.drop_path2(block.ls2(mlp_forward(block.mlp, block.norm2(x))))


def _lean_mlp_fits(mlp: nn.Module) -> bool:
    """Whether timm's ``Mlp`` is fc1 -> exact GELU -> fc2 with nothing else acting (no dropout in
    training, no hidden norm), which :func:`~editor_reid.model._mlp.gelu_mlp` computes."""
    def inactive(drop: nn.Module) -> bool:
        return isinstance(drop, nn.Identity) or (isinstance(drop, nn.Dropout) and (drop.p == 0 or not drop.training))

    if not all(hasattr(mlp, name) for name in ("fc1", "act", "drop1", "norm", "fc2", "drop2")):
        return False  # another MLP (timm's GluMlp, SwiGLU, ...): run as it is
    return (type(mlp.act) is nn.GELU and mlp.act.approximate == "none" and isinstance(mlp.norm, nn.Identity)
            and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
            and inactive(mlp.drop1) and inactive(mlp.drop2))


def mlp_forward(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Mlp`` on x; with gradients and ``mlp.lean`` set (``model.lean_mlp``), through
    :func:`~editor_reid.model._mlp.gelu_mlp` where the MLP is fc1 -> GELU -> fc2 (the same
    output; less kept for the backward pass)."""
    if getattr(mlp, "lean", False) and torch.is_grad_enabled() and _lean_mlp_fits(mlp):
        return gelu_mlp(x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    return mlp(x)


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """timm's ``Block.forward`` (fused attention), with the MLP of :func:`mlp_forward`."""
    x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
    return x + block.drop_path2(block.ls2(mlp_forward(block.mlp, block.norm2(x))))


def embed_tokens(vit: nn.Module, images: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Patchify, prepend CLS, add the position table (and ``offset``, broadcast to [B, 1+N, D]),
    then timm's embedding dropouts and pre-norm: images [B, 3, H, W] -> [B, 1+N, D]."""
    x = vit.patch_embed(images)  # [B, N, D]
    x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + vit.pos_embed
    if offset is not None:
        x = x + offset
    return vit.norm_pre(vit.patch_drop(vit.pos_drop(x)))


def run_blocks(vit: nn.Module, x: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """timm's own block forward (fused attention): [B, L, D] -> [B, L, D], before the final norm.

    ``checkpoint``: with gradients, keep only each block's input and recompute the block in the
    backward pass (``torch.utils.checkpoint``, non-reentrant; the RNG state of drop path is
    replayed, so the gradients are those of the plain forward)."""
    for block in vit.blocks:
        if checkpoint and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block_forward, block, x, use_reentrant=False)
        else:
            x = block_forward(block, x)
    return x


def final_norm(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return vit.norm(x)


# ----------------------------------------------------------------------------- checkpoint converters


def load_npz_weights(vit: nn.Module, path: str | Path) -> None:
    """Load a Google ViT ``.npz`` into ``vit`` in place (timm's loader; raises KeyError/RuntimeError
    when the file does not fit)."""
    with torch.no_grad():
        _function("_load_weights")(vit, str(path))


def convert_openai_clip(state: dict[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
    """OpenAI CLIP ``visual.*`` keys -> timm ViT keys (``visual.proj`` becomes ``head.*``); the
    text tower's keys are dropped."""
    return _function("_convert_openai_clip")(state, vit, prefix="visual.")
