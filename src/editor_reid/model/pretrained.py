"""Pretrained backbone weights from local files (no downloads).

Supported files (``cfg.model.pretrain_path``):

* ImageNet ViT (``pretrain_choice: imagenet``): TransReID/timm ``.pth`` state dicts (e.g.
  ``jx_vit_base_p16_224-80ecf9dd.pth``), ``.safetensors`` in timm's key layout, and Google's
  ``.npz`` ViT checkpoints (read by timm's own npz loader);
* OpenAI CLIP (``pretrain_choice: clip``): ``ViT-B-16.pt`` (a TorchScript archive, opened with
  ``torch.jit.load`` only when it is not a plain state dict) or any state dict with ``visual.*``
  keys; converted with timm's OpenAI-CLIP key filter.

Loading follows the official rule (spec §1.4): unwrap ``model``/``state_dict``, skip keys that
contain ``head`` or ``dist`` (and timm's obsolete ``pre_logits``), reshape a 2-D patch-embedding
weight to the conv shape, resize ``pos_embed`` from the pretrained grid with bilinear
interpolation (``align_corners=False``), copy everything else by name. Every other key must
exist in the backbone with the same shape, and every backbone tensor except the SIE table and the
unused ``fc`` must be provided; otherwise a :class:`PretrainedLoadError` names the keys.
"""

from __future__ import annotations

import math
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from editor_reid.model.backbone import PATCH_SIZE, ViTBackbone

__all__ = ["PretrainedLoadError", "PretrainedReport", "load_pretrained", "read_state_dict", "resize_pos_embed"]

PRETRAIN_CHOICES = ("imagenet", "clip", "none")
# Backbone tensors a pretrained ViT does not provide: trained from scratch (SIE) or unused (fc).
_OPTIONAL = re.compile(r"^(sie_embed|fc\.(weight|bias))$")


class PretrainedLoadError(ValueError):
    """A pretrained file is unreadable or does not fit the backbone; the message names the keys."""


@dataclass
class PretrainedReport:
    path: str
    layout: str  # "timm" | "clip" | "npz"
    loaded_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)  # in the file, deliberately not loaded
    missing_keys: list[str] = field(default_factory=list)  # backbone tensors left at their init
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


def resize_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int = 1
) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of a [1, prefix+H*W, D] table to another grid (spec §1.4)."""
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise PretrainedLoadError(f"'{path}' does not contain a state dict (got {type(obj).__name__})")
    if all(k.startswith("module.") for k in obj):  # saved from a DataParallel/DDP wrapper
        obj = {k[len("module."):]: v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PretrainedLoadError(f"'{path}': entries {bad[:5]} are not tensors; expected a state dict")
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.safetensors`` file (or a TorchScript archive) into a state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights '{path}' (model.pretrain_path) do not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    if _is_torchscript(path):  # OpenAI's ViT-B-16.pt; weights_only loading cannot open it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still reads it
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        return _unwrap(dict(obj), path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise PretrainedLoadError(f"cannot read pretrained weights '{path}': {exc}") from exc
    return _unwrap(obj, path)


def _npz_state_dict(path: Path, backbone: ViTBackbone) -> dict[str, torch.Tensor]:
    """Read a Google ViT ``.npz`` with timm's loader into a timm ViT at the checkpoint's own grid."""
    from timm.models.vision_transformer import _load_weights

    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        pos_key = next((k for k in names if k.endswith("posembed_input/pos_embedding")), None)
        if pos_key is None:
            raise PretrainedLoadError(
                f"'{path}' is not a ViT .npz checkpoint (no 'Transformer/posembed_input/pos_embedding')"
            )
        pos_shape = archive[pos_key].shape
    blocks = {int(m.group(1)) for k in names if (m := re.search(r"encoderblock_(\d+)/", k))}
    if len(blocks) != backbone.depth or pos_shape[-1] != backbone.embed_dim:
        raise PretrainedLoadError(
            f"'{path}' holds a ViT of width {pos_shape[-1]} and depth {len(blocks)}; the backbone "
            f"({backbone.transformer_type}) has width {backbone.embed_dim} and depth {backbone.depth}"
        )
    side = math.isqrt(pos_shape[1] - 1)
    if side * side != pos_shape[1] - 1:
        raise PretrainedLoadError(f"'{path}': position table of {pos_shape[1] - 1} patches is not a square grid")
    native = type(backbone)(
        backbone.transformer_type,
        (side * PATCH_SIZE, side * PATCH_SIZE),
        embed_dim=backbone.embed_dim,
        depth=backbone.depth,
        num_heads=backbone.num_heads,
        drop_path=0.0,
    ).vit
    try:
        with torch.no_grad():
            _load_weights(native, str(path))
    except (KeyError, RuntimeError) as exc:
        raise PretrainedLoadError(f"'{path}' does not fit {backbone.transformer_type}: {exc}") from exc
    return native.state_dict()


def _convert_clip(state: dict[str, torch.Tensor], vit: nn.Module) -> dict[str, torch.Tensor]:
    from timm.models.vision_transformer import _convert_openai_clip

    prefix = "module.visual." if "module.visual.class_embedding" in state else "visual."
    return _convert_openai_clip(state, vit, prefix=prefix)


def _detect_layout(state: dict[str, torch.Tensor]) -> str:
    if "visual.class_embedding" in state or "module.visual.class_embedding" in state:
        return "clip"
    return "timm"


def _ignored(key: str) -> bool:
    return "head" in key or "dist" in key or key.startswith("pre_logits")


def _square_grid(count: int, key: str, path: str) -> tuple[int, int]:
    side = math.isqrt(count)
    if side * side != count:
        raise PretrainedLoadError(
            f"'{path}': '{key}' holds {count} patch positions, not a square grid; cannot infer its layout"
        )
    return side, side


def load_pretrained(model_or_backbone: nn.Module, path: str | Path, choice: str = "imagenet") -> PretrainedReport:
    """Load local pretrained weights into the backbone of an EDITOR model (or a ViTBackbone).

    ``choice`` is ``cfg.model.pretrain_choice``; ``"none"`` loads nothing. Raises
    FileNotFoundError for a missing file and :class:`PretrainedLoadError` for a file that does
    not match the architecture (the message lists the offending keys and shapes).
    """
    if choice not in PRETRAIN_CHOICES:
        raise PretrainedLoadError(f"model.pretrain_choice '{choice}' is not one of {', '.join(PRETRAIN_CHOICES)}")
    backbone = getattr(model_or_backbone, "backbone", model_or_backbone)
    if not isinstance(backbone, ViTBackbone):
        raise TypeError(f"load_pretrained expects an EDITOR model or a ViTBackbone, got {type(model_or_backbone).__name__}")
    path = Path(path)
    if choice == "none":
        return PretrainedReport(path=str(path), layout="none")
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights '{path}' (model.pretrain_path) do not exist")
    if path.suffix == ".npz":
        state, layout = _npz_state_dict(path, backbone), "npz"
    else:
        state = read_state_dict(path)
        layout = _detect_layout(state)
        if layout == "clip":
            state = _convert_clip(state, backbone.vit)
    if (choice == "clip") != (layout == "clip"):
        found = "an OpenAI CLIP (visual.*)" if layout == "clip" else "a timm/ImageNet ViT"
        raise PretrainedLoadError(
            f"'{path}' is {found} checkpoint but model.pretrain_choice is '{choice}' "
            f"(use 'clip' with vit_base_patch16_clip_224, 'imagenet' with the ImageNet ViTs)"
        )

    report = PretrainedReport(path=str(path), layout=layout)
    own = backbone.state_dict()
    converted: dict[str, torch.Tensor] = {}
    distilled = "dist_token" in state
    for key, value in state.items():
        if _ignored(key):
            report.ignored_keys.append(key)
            continue
        target = key if key in ("sie_embed",) or key.startswith("fc.") else f"vit.{key}"
        if target not in own:
            converted[target] = value  # reported as unexpected below
            continue
        expected = own[target].shape
        if key == "patch_embed.proj.weight" and value.ndim == 2 and value.numel() == own[target].numel():
            value = value.reshape(expected)
        elif key == "pos_embed" and value.shape != expected:
            prefix = 2 if distilled else 1
            old_grid = _square_grid(value.shape[1] - prefix, key, str(path))
            resized = resize_pos_embed(value, old_grid, backbone.grid_size, num_prefix=prefix)
            if distilled:
                resized = torch.cat([resized[:, :1], resized[:, 2:]], dim=1)
            report.resized[key] = (tuple(value.shape), tuple(resized.shape))
            value = resized
        converted[target] = value

    unexpected = sorted(k for k in converted if k not in own)
    mismatched = sorted(
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in converted.items()
        if k in own and v.shape != own[k].shape
    )
    missing = sorted(k for k in own if k not in converted and not _OPTIONAL.match(k))
    if unexpected or mismatched or missing:
        lines = [f"pretrained weights '{path}' ({layout} layout) do not fit the {backbone.transformer_type} backbone:"]
        if unexpected:
            lines.append(f"  keys not in the model: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
        if mismatched:
            lines.append(f"  shape mismatches: {'; '.join(mismatched[:20])}")
        if missing:
            lines.append(f"  model keys not in the file: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
        raise PretrainedLoadError("\n".join(lines))
    with torch.no_grad():
        for key, value in converted.items():
            own[key].copy_(value.to(own[key].dtype))
    report.loaded_keys = sorted(converted)
    report.missing_keys = sorted(k for k in own if k not in converted)
    return report
