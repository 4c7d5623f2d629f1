"""Import (and export) state dicts in the official EDITOR key layout (docs/official-behaviour.md#checkpoint-layout).

Our modules use clean names; this module is the single place that knows the official ones:

==================================  ==========================================
official                            ours
==================================  ==========================================
BACKBONE.base.sie_embed             backbone.sie_embed
BACKBONE.base.fc.*                  backbone.fc.* (unused classifier)
BACKBONE.base.<timm ViT key>        backbone.vit.<timm ViT key>
FUSE_block.norm{R,N,T}.*            hma.modal_blocks.{RGB,NI,TI}.norm1.*
FUSE_block.attn{R,N,T}.*            hma.modal_blocks.{RGB,NI,TI}.attn.*
FUSE_block.norm{R,N,T}_.*           hma.modal_blocks.{RGB,NI,TI}.norm2.*
FUSE_block.mlp{R,N,T}.*             hma.modal_blocks.{RGB,NI,TI}.mlp.*
FUSE_block.{norm1,attn1,norm2,mlp}  hma.fusion_block.{norm1,attn,norm2,mlp}
FUSE_block.out_norm.*               hma.out_norm.*
{RGB,NIR,TIR}_REDUCE.*              hma.reduce.{RGB,NI,TI}.*
FUSE_HEAD / FUSE_BN                 fuse_head / fuse_bn
BACKBONE_HEAD / BACKBONE_BN         backbone_head / backbone_bn
AL_HEAD / AL_BN                     al_head / al_bn (AL=1 only)
FREQ_INDEX.{DWT,IDWT}.*             fixed Haar filters: ignored
FUSE_block.memory_cls.*_centers     OCFR centres: returned in ``report.extra["ocfr_centers"]``
==================================  ==========================================

Loading is a filter function (:func:`official_to_ours`: official state dict in, ours out)
followed by one ``load_state_dict``; the fit is checked before that load, so a checkpoint that
does not fit leaves the model untouched.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from editor_reid.errors import EditorReidError

__all__ = [
    "LoadReport",
    "OfficialCheckpointError",
    "is_official_state_dict",
    "load_official_checkpoint",
    "official_key",
    "official_model_sizes",
    "official_to_ours",
    "to_official_state_dict",
]

_LETTER = {"RGB": "R", "NI": "N", "TI": "T"}
_REDUCE = {"RGB": "RGB", "NI": "NIR", "TI": "TIR"}
_CENTERS = {"RGB": "RGB_centers", "NI": "NIR_centers", "TI": "TIR_centers"}
_HEADS = {
    "fuse_head": "FUSE_HEAD",
    "fuse_bn": "FUSE_BN",
    "backbone_head": "BACKBONE_HEAD",
    "backbone_bn": "BACKBONE_BN",
    "al_head": "AL_HEAD",
    "al_bn": "AL_BN",
}
_FUSION = {"norm1": "norm1", "attn": "attn1", "norm2": "norm2", "mlp": "mlp"}
_MODAL = {"norm1": "norm{}", "attn": "attn{}", "norm2": "norm{}_", "mlp": "mlp{}"}
_CENTRE_KEY = re.compile(r"^FUSE_block\.memory_cls\.(RGB|NIR|TIR)_centers$")
_CENTRE_MODALITY = {"RGB": "RGB", "NIR": "NI", "TIR": "TI"}


class OfficialCheckpointError(EditorReidError, ValueError):
    """An official checkpoint does not fit the model; the message names the keys."""


@dataclass
class LoadReport:
    loaded_keys: list[str] = field(default_factory=list)  # our names
    ignored_keys: list[str] = field(default_factory=list)  # official names present but not loaded
    missing_keys: list[str] = field(default_factory=list)  # our head/BN tensors the file did not provide
    extra: dict = field(default_factory=dict)  # {"ocfr_centers": {"RGB": [K, D], "NI": ..., "TI": ...}}


def official_key(key: str) -> str:
    """Official name of one of our state-dict keys (raises KeyError for an unknown key)."""
    if key == "backbone.sie_embed" or key.startswith("backbone.fc."):
        return "BACKBONE.base." + key[len("backbone.") :]
    if key.startswith("backbone.vit."):
        return "BACKBONE.base." + key[len("backbone.vit.") :]
    if m := re.match(r"^hma\.modal_blocks\.(RGB|NI|TI)\.(norm1|attn|norm2|mlp)\.(.+)$", key):
        return f"FUSE_block.{_MODAL[m.group(2)].format(_LETTER[m.group(1)])}.{m.group(3)}"
    if m := re.match(r"^hma\.fusion_block\.(norm1|attn|norm2|mlp)\.(.+)$", key):
        return f"FUSE_block.{_FUSION[m.group(1)]}.{m.group(2)}"
    if key.startswith("hma.out_norm."):
        return "FUSE_block." + key[len("hma.") :]
    if m := re.match(r"^hma\.reduce\.(RGB|NI|TI)\.(.+)$", key):
        return f"{_REDUCE[m.group(1)]}_REDUCE.{m.group(2)}"
    head, _, rest = key.partition(".")
    if head in _HEADS and rest:
        return f"{_HEADS[head]}.{rest}"
    raise KeyError(f"no official name for model key '{key}'")


def _is_head(our_key: str) -> bool:
    return our_key.split(".", 1)[0] in _HEADS


def _haar_filter_buffers() -> dict[str, torch.Tensor]:
    """The fixed filter buffers the official FREQ_INDEX module stores (pytorch_wavelets layout)."""
    s = 1.0 / math.sqrt(2.0)
    low, high = torch.tensor([s, s]), torch.tensor([s, -s])
    out = {}
    for module, (lo, hi) in (("DWT", ("h0", "h1")), ("IDWT", ("g0", "g1"))):
        for name, taps in ((lo, low), (hi, high)):
            out[f"FREQ_INDEX.{module}.{name}_col"] = taps.reshape(1, 1, 2, 1).clone()
            out[f"FREQ_INDEX.{module}.{name}_row"] = taps.reshape(1, 1, 1, 2).clone()
    return out


def to_official_state_dict(model: nn.Module, ocfr_centers: dict[str, torch.Tensor] | None = None) -> OrderedDict:
    """Our model's state dict renamed to the official layout (docs/official-behaviour.md#checkpoint-layout), with the
    Haar filter buffers and the OCFR centres (zeros unless given) the official checkpoints carry."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in model.state_dict().items():
        out[official_key(key)] = value.detach().clone()
    out.update(_haar_filter_buffers())
    if getattr(model, "hma", None) is not None:
        for modality, name in _CENTERS.items():
            centre = None if ocfr_centers is None else ocfr_centers.get(modality)
            if centre is None:
                centre = torch.zeros(model.num_classes, model.embed_dim)
            out[f"FUSE_block.memory_cls.{name}"] = centre.detach().clone()
    return out


def _without_module_prefix(state: Mapping) -> dict:
    """A copy of ``state`` without DDP's "module." prefix; the official loader strips it the same way."""
    state = dict(state)  # the prefix is consumed in place
    consume_prefix_in_state_dict_if_present(state, "module.")
    return state


def is_official_state_dict(state) -> bool:
    """True for a non-empty mapping in the official key layout (``BACKBONE.base.*`` or
    ``FUSE_block.*`` keys, with or without DDP's "module." prefix)."""
    if not isinstance(state, Mapping) or not state:
        return False
    keys = _without_module_prefix({k: None for k in state if isinstance(k, str)})
    return any(k.startswith(("BACKBONE.base.", "FUSE_block.")) for k in keys)


def official_model_sizes(state: Mapping) -> tuple[int | None, int | None]:
    """(num_classes, num_cameras) an official checkpoint was trained with, read from the rows of
    ``FUSE_HEAD.weight`` and of the SIE table ``BACKBONE.base.sie_embed``; None where absent."""
    state = _without_module_prefix(state)
    head, sie = state.get("FUSE_HEAD.weight"), state.get("BACKBONE.base.sie_embed")
    num_classes = int(head.shape[0]) if isinstance(head, torch.Tensor) and head.dim() == 2 else None
    num_cameras = int(sie.shape[0]) if isinstance(sie, torch.Tensor) and sie.dim() == 3 else None
    return num_classes, num_cameras


def _read(path_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, (str, Path)):
        path = Path(path_or_state_dict)
        if not path.is_file():
            raise FileNotFoundError(f"official checkpoint '{path}' does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - reported with the path
            raise OfficialCheckpointError(f"cannot read official checkpoint '{path}': {exc}") from exc
        source = str(path)
    else:
        state, source = path_or_state_dict, "<state dict>"
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise OfficialCheckpointError(f"{source} is not a state dict of tensors")
    return state


def official_to_ours(
    state: Mapping[str, torch.Tensor], model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str]]:
    """An official state dict (DDP's "module." prefix allowed) -> (state dict in our names, OCFR
    centres keyed RGB/NI/TI, official keys deliberately not loaded).

    Not loaded: the fixed Haar filters, the OCFR centres (returned instead) and heads ``model``
    does not build (``AL_*`` for an AL=0 model). A key with no counterpart in ``model`` is kept
    under its official name, so that loading reports it.
    """
    to_ours = {official_key(k): k for k in model.state_dict()}
    ours: dict[str, torch.Tensor] = {}
    centres: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in _without_module_prefix(state).items():
        if key.startswith("FREQ_INDEX."):
            ignored.append(key)
        elif m := _CENTRE_KEY.match(key):
            centres[_CENTRE_MODALITY[m.group(1)]] = value
            ignored.append(key)
        elif key in to_ours:
            ours[to_ours[key]] = value
        elif key.split(".", 1)[0] in _HEADS.values():
            ignored.append(key)
        else:
            ours[key] = value
    return ours, centres, ignored


def _fit_problems(ours: dict[str, torch.Tensor], own: dict[str, torch.Tensor], missing: list[str]) -> list[str]:
    """What ``load_state_dict`` would refuse, or leave out of the feature path, as report lines
    in official names (none: it fits)."""
    mismatched = [
        f"{official_key(k)} -> {k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in ours.items()
        if k in own and v.shape != own[k].shape
    ]
    unexpected = [k for k in ours if k not in own]
    required = [official_key(k) for k in missing if not _is_head(k) and not k.startswith("backbone.fc.")]
    lines = []
    if mismatched:
        lines.append("  shape mismatches: " + "; ".join(mismatched[:20]))
    if unexpected:
        lines.append("  keys not in the model: " + ", ".join(unexpected[:20]))
    if required:
        lines.append("  model keys not in the file: " + ", ".join(required[:20]))
    return lines


def load_official_checkpoint(model: nn.Module, path_or_state_dict) -> LoadReport:
    """Load an official EDITOR ``.pth`` (or its state dict) into ``model``.

    Strict about shapes and about the feature path: every backbone / HMA / REDUCE tensor must be
    in the file, and an unknown key is an error. Head and BN tensors absent from the file are left
    as they are and listed in ``missing_keys``; official heads the model does not have (``AL_*``
    for an AL=0 model) are listed in ``ignored_keys``. The OCFR centres are returned in
    ``report.extra["ocfr_centers"]`` (keyed RGB/NI/TI) for the loss module.
    """
    ours, centres, ignored = official_to_ours(_read(path_or_state_dict), model)
    own = model.state_dict()
    # Counted before loading, so that a checkpoint that does not fit changes nothing; and not taken
    # from load_state_dict, whose BatchNorm fills in a missing num_batches_tracked and omits it.
    missing = [k for k in own if k not in ours]
    problems = _fit_problems(ours, own, missing)
    if problems:
        header = "official checkpoint does not fit the model (check num_classes, num_cameras, model.al, input size):"
        raise OfficialCheckpointError("\n".join([header, *problems]))
    model.load_state_dict(ours, strict=False)
    report = LoadReport(loaded_keys=sorted(ours), ignored_keys=ignored, missing_keys=missing)
    if centres:
        report.extra["ocfr_centers"] = centres
    return report
