"""Pretrained backbone weights from local files (no downloads).

Supported files (``cfg.model.pretrain_path``):

* ImageNet ViT (``pretrain_choice: imagenet``): TransReID/timm ``.pth`` state dicts (e.g.
  ``jx_vit_base_p16_224-80ecf9dd.pth``), ``.safetensors`` in timm's key layout, and Google's
  ``.npz`` ViT checkpoints (read by timm's own npz loader);
* CLIP (``pretrain_choice: clip``): OpenAI's ``ViT-B-16.pt`` (a TorchScript archive, read by
  :func:`read_torchscript_weights` without running any of its code) or any state dict with
  ``visual.*`` keys: open_clip's ``open_clip_pytorch_model.bin`` / ``open_clip_model.safetensors``
  and its training checkpoints (``{"state_dict": {"module.visual...."}, "optimizer": ...}``);
  converted with timm's OpenAI-CLIP key filter (docs/clip.md).

No file is ever unpickled with code execution: ``.pth``/``.pt`` files go through
``torch.load(weights_only=True)`` and TorchScript archives through a restricted unpickler that
rebuilds tensors only.

Loading follows the official rule (docs/official-behaviour.md#pretrained-weights): unwrap ``model``/``state_dict``,
skip keys that contain ``head`` or ``dist`` (and timm's obsolete ``pre_logits``), reshape a 2-D patch-embedding
weight to the conv shape, resize ``pos_embed`` from the pretrained grid with bilinear
interpolation (``align_corners=False``), copy everything else by name. Every other key must
exist in the backbone with the same shape, and every backbone tensor except the SIE table and the
unused ``fc`` must be provided; otherwise a :class:`PretrainedLoadError` names the keys.

As in timm, the conversion is a filter function (:func:`filter_pretrained`: state dict in, the
backbone's state dict out) followed by one ``load_state_dict``. The fit is checked before that
load, so a file that does not fit leaves the backbone untouched.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from editor_reid.errors import EditorReidError
from editor_reid.model import _timm
from editor_reid.model.backbone import PATCH_SIZE, ViTBackbone

__all__ = [
    "PretrainedLoadError",
    "PretrainedReport",
    "filter_pretrained",
    "load_pretrained",
    "read_state_dict",
    "read_torchscript_weights",
]

PRETRAIN_CHOICES = ("imagenet", "clip", "none")
# Backbone tensors a pretrained ViT does not provide: trained from scratch (SIE) or unused (fc).
_OPTIONAL = re.compile(r"^(sie_embed|fc\.(weight|bias))$")


class PretrainedLoadError(EditorReidError, ValueError):
    """A pretrained file is unreadable or does not fit the backbone; the message names the keys."""


@dataclass
class PretrainedReport:
    path: str
    layout: str  # "timm" | "clip" | "npz"
    loaded_keys: list[str] = field(default_factory=list)
    ignored_keys: list[str] = field(default_factory=list)  # in the file, deliberately not loaded
    missing_keys: list[str] = field(default_factory=list)  # backbone tensors left at their init
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in archive.namelist())


# ----------------------------------------------------------------------------- TorchScript archives
#
# A TorchScript archive (torch.jit.save) is a zip: ``<name>/data.pkl`` pickles the module tree,
# ``<name>/data/<key>`` holds the raw bytes of each storage, ``<name>/code/`` the TorchScript
# source. ``torch.jit.load`` compiles and runs that code and unpickles without restriction, so a
# crafted ViT-B-16.pt could run anything. Only data.pkl is read here, and its globals are limited
# to what rebuilds tensors; the module objects (``__torch__.*`` classes) become inert attribute
# holders, from which the tensors are collected under their dotted attribute paths (the names
# ``state_dict()`` gives them).

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _ScriptObject:
    """A TorchScript module or class instance as plain data: its pickled attributes, no methods."""

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.attributes = {}
        return obj

    def __init__(self, *args, **kwargs) -> None:  # called by REDUCE; the arguments are ignored
        pass

    def __setstate__(self, state) -> None:
        self.attributes = dict(state) if isinstance(state, dict) else {}


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> torch.Tensor:
    """``torch._utils._rebuild_tensor_v2`` on a flat tensor standing for the storage."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("a tensor's storage is not a storage record")
    try:
        return storage.as_strided(tuple(int(n) for n in size), tuple(int(n) for n in stride), int(offset))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise pickle.UnpicklingError(f"tensor of size {size} does not fit its storage: {exc}") from exc


def _type_tag(value, _type_name):
    return value


_SAFE_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): list,
    ("torch.jit._pickle", "build_doublelist"): list,
    ("torch.jit._pickle", "build_boollist"): list,
    ("torch.jit._pickle", "build_tensorlist"): list,
    ("torch.jit._pickle", "restore_type_tag"): _type_tag,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, read_storage) -> None:
        super().__init__(file)
        self._read_storage = read_storage

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        raise pickle.UnpicklingError(
            f"global '{module}.{name}' is not allowed (only tensors and module attributes are read)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}; expected a storage record")
        _, dtype, key, _location, numel = pid
        return self._read_storage(str(key), dtype, int(numel))


def _collect_tensors(root: _ScriptObject) -> dict[str, torch.Tensor]:
    """Every tensor reachable through module attributes, keyed by its dotted path."""
    out: dict[str, torch.Tensor] = {}
    stack, seen = [("", root)], {id(root)}
    while stack:
        prefix, obj = stack.pop()
        for name, value in obj.attributes.items():
            if isinstance(value, torch.Tensor):
                out[prefix + str(name)] = value
            elif isinstance(value, _ScriptObject) and id(value) not in seen:
                seen.add(id(value))
                stack.append((f"{prefix}{name}.", value))
    return out


def read_torchscript_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive (e.g. OpenAI's ``ViT-B-16.pt``), by
    their ``state_dict`` names, without running the archive's code or any pickled callable."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise PretrainedLoadError(f"'{path}' is a TorchScript archive without one '<name>/data.pkl' "
                                          "(archives written before torch 1.4 are not supported)")
            prefix = pickles[0][: -len("data.pkl")]
            if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() != b"little":
                raise PretrainedLoadError(f"'{path}' stores big-endian tensors; only little-endian archives are read")
            storages: dict[str, torch.Tensor] = {}

            def read_storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
                if key not in storages:
                    member = f"{prefix}data/{key}"
                    if member not in names:
                        raise pickle.UnpicklingError(f"storage '{member}' is missing from the archive")
                    raw = bytearray(archive.read(member))
                    size = numel * torch.empty((), dtype=dtype).element_size()
                    if len(raw) < size:
                        raise pickle.UnpicklingError(f"storage '{member}' holds {len(raw)} bytes, expected {size}")
                    storages[key] = torch.frombuffer(raw[:size], dtype=dtype) if size else torch.empty(0, dtype=dtype)
                return storages[key]

            root = _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), read_storage).load()
    except PretrainedLoadError:
        raise
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, TypeError, KeyError) as exc:
        raise PretrainedLoadError(f"cannot read the TorchScript archive '{path}': {exc}") from exc
    if not isinstance(root, _ScriptObject):
        raise PretrainedLoadError(f"'{path}': data.pkl holds a {type(root).__name__}, not a TorchScript module")
    return _collect_tensors(root)


def _unwrap(obj, path: Path) -> dict[str, torch.Tensor]:
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise PretrainedLoadError(f"'{path}' does not contain a state dict (got {type(obj).__name__})")
    state = dict(obj)  # the prefix is consumed in place
    consume_prefix_in_state_dict_if_present(state, "module.")  # saved from a DataParallel/DDP wrapper
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PretrainedLoadError(f"'{path}': entries {bad[:5]} are not tensors; expected a state dict")
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.safetensors`` file (or a TorchScript archive) into a state dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights '{path}' (model.pretrain_path) do not exist")
    if path.suffix == ".safetensors":
        return dict(load_file(str(path), device="cpu"))
    if _is_torchscript(path):  # OpenAI's ViT-B-16.pt; weights_only loading cannot open it
        return _unwrap(read_torchscript_weights(path), path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the path
        raise PretrainedLoadError(f"cannot read pretrained weights '{path}': {exc}") from exc
    return _unwrap(obj, path)


def _npz_state_dict(path: Path, backbone: ViTBackbone) -> dict[str, torch.Tensor]:
    """Read a Google ViT ``.npz`` with timm's loader into a timm ViT at the checkpoint's own grid."""
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
        _timm.load_npz_weights(native, path)
    except (KeyError, RuntimeError) as exc:
        raise PretrainedLoadError(f"'{path}' does not fit {backbone.transformer_type}: {exc}") from exc
    return native.state_dict()


def _is_clip(state: dict[str, torch.Tensor]) -> bool:
    return "visual.class_embedding" in state


def _ignored(key: str) -> bool:
    return "head" in key or "dist" in key or key.startswith("pre_logits")


def _resize_pos_embed(table: torch.Tensor, new_grid: tuple[int, int], distilled: bool) -> torch.Tensor:
    """[1, prefix+s*s, D] -> [1, 1+rows*cols, D] on the backbone's grid. A distilled table's
    second prefix token (the distillation token's position) is dropped after the resize."""
    prefix = 2 if distilled else 1
    count = table.shape[1] - prefix
    side = math.isqrt(count)
    if side * side != count:
        raise PretrainedLoadError(
            f"'pos_embed' holds {count} patch positions, not a square grid; cannot infer its layout"
        )
    # The official resize is bilinear without antialiasing; timm's defaults (bicubic, antialias) differ.
    # fp32 throughout: OpenAI's fp16 table is not rounded back to fp16 after the interpolation.
    resized = resample_abs_pos_embed(
        table.float(),
        new_size=list(new_grid),
        old_size=[side, side],
        num_prefix_tokens=prefix,
        interpolation="bilinear",
        antialias=False,
        align_corners=False,
    )
    return torch.cat([resized[:, :1], resized[:, 2:]], dim=1) if distilled else resized


def filter_pretrained(state: dict[str, torch.Tensor], backbone: ViTBackbone) -> dict[str, torch.Tensor]:
    """A pretrained state dict (timm or OpenAI CLIP key layout) -> a state dict for ``backbone``.

    Drops the ``head``/``dist``/``pre_logits`` keys, reshapes a 2-D patch-embedding weight to
    the conv shape and resizes ``pos_embed`` to the backbone's grid. Keys the backbone does not
    have are kept (under their ``vit.`` name) so that loading reports them.
    """
    if _is_clip(state):
        state = _timm.convert_openai_clip(state, backbone.vit)
    own = backbone.state_dict()
    distilled = "dist_token" in state
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if _ignored(key):
            continue
        target = key if key == "sie_embed" or key.startswith("fc.") else f"vit.{key}"
        expected = own[target].shape if target in own else None
        if key == "patch_embed.proj.weight" and expected and value.ndim == 2 and value.numel() == expected.numel():
            value = value.reshape(expected)
        elif key == "pos_embed" and expected and value.shape != expected:
            value = _resize_pos_embed(value, backbone.grid_size, distilled)
        out[target] = value
    return out


def _fit_problems(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> list[str]:
    """What ``load_state_dict`` would refuse or leave out, as report lines (none: it fits)."""
    unexpected = sorted(k for k in state if k not in own)
    mismatched = sorted(
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    )
    missing = sorted(k for k in own if k not in state and not _OPTIONAL.match(k))
    lines = []
    if unexpected:
        lines.append(f"  keys not in the model: {', '.join(unexpected[:20])}" + (" ..." if len(unexpected) > 20 else ""))
    if mismatched:
        lines.append(f"  shape mismatches: {'; '.join(mismatched[:20])}")
    if missing:
        lines.append(f"  model keys not in the file: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else ""))
    return lines


def _read_pretrained(path: Path, backbone: ViTBackbone) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict in timm's key layout, the layout of the file)."""
    if path.suffix == ".npz":
        return _npz_state_dict(path, backbone), "npz"
    state = read_state_dict(path)
    if _is_clip(state):
        return _timm.convert_openai_clip(state, backbone.vit), "clip"
    return state, "timm"


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
    state, layout = _read_pretrained(path, backbone)
    if (choice == "clip") != (layout == "clip"):
        found = "an OpenAI CLIP (visual.*)" if layout == "clip" else "a timm/ImageNet ViT"
        raise PretrainedLoadError(
            f"'{path}' is {found} checkpoint but model.pretrain_choice is '{choice}' "
            f"(use 'clip' with vit_base_patch16_clip_224, 'imagenet' with the ImageNet ViTs)"
        )
    try:
        converted = filter_pretrained(state, backbone)
    except PretrainedLoadError as exc:
        raise PretrainedLoadError(f"'{path}': {exc}") from exc
    problems = _fit_problems(converted, backbone.state_dict())
    if problems:
        header = f"pretrained weights '{path}' ({layout} layout) do not fit the {backbone.transformer_type} backbone:"
        raise PretrainedLoadError("\n".join([header, *problems]))
    result = backbone.load_state_dict(converted, strict=False)  # nothing unexpected: checked above
    report = PretrainedReport(path=str(path), layout=layout, ignored_keys=[k for k in state if _ignored(k)])
    report.loaded_keys = sorted(converted)
    report.missing_keys = sorted(result.missing_keys)
    if "vit.pos_embed" in converted and converted["vit.pos_embed"].shape != state["pos_embed"].shape:
        report.resized["pos_embed"] = (tuple(state["pos_embed"].shape), tuple(converted["vit.pos_embed"].shape))
    return report
