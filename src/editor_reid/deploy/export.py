"""``editor-reid export``: an EDITOR checkpoint as one ONNX graph with a dynamic batch (docs/export.md).

The graph takes the three normalised modality images ``RGB``, ``NI``, ``TI`` (float32
[B, 3, H, W], after the test transform; an absent modality is the zero image of
:func:`editor_reid.modalities.absent_like`) and the camera ids ``cam_ids`` (int64 [B],
:data:`~editor_reid.model.backbone.UNKNOWN_CAMERA` = -1 for an unknown camera), and returns
``feature`` (float32 [B, 3D], what ``EDITOR.forward`` returns in eval mode: the pre-BN f_HMA)
and ``token_mask`` (bool [B, N], the SFTS selection M_U of each sample).

The evaluation path of the PyTorch model gathers each sample's kept tokens into a compact,
padded sequence whose length is read on the host (``editor_reid.model.hma``); a graph cannot
hold that shape. :class:`ExportGraph` computes the same features with the direct masked
computation the gathering stands for, on fixed-length sequences: the backbone runs every token,
SFTS picks the tokens inside the graph (rollout, Haar transform, ``TopK``), and each HMA block
zeroes the dropped tokens before its projections and attends with a key mask, so a dropped
token is exactly zero at every step and influences nothing; the patch mean divides by |M_U|.
The selection stays per sample and data-dependent; only the amount of work no longer shrinks
with it. The model itself is not changed: the graph reuses its modules and weights.

The file's ``metadata_props`` make it usable alone (:data:`METADATA_KEYS`): the config, the
feature width, the SIE camera count, the model fingerprint and the editor-reid version.
onnx and onnxscript (the ``onnx`` extra) are imported only here, when a graph is exported.
"""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import torch
from torch import nn

import editor_reid
from editor_reid.config import Config, config_to_dict
from editor_reid.errors import EditorReidError, UsageError
from editor_reid.fileio import atomic_write
from editor_reid.model import _timm
from editor_reid.model.backbone import rollout_cls_row
from editor_reid.model.editor import EDITOR
from editor_reid.model.sfts import SFTS, apply_token_mask
from editor_reid.modalities import MODALITIES

__all__ = [
    "INPUT_NAMES",
    "METADATA_KEYS",
    "OPSETS",
    "OUTPUT_NAMES",
    "ExportGraph",
    "OnnxUnavailableError",
    "export_model",
    "export_onnx",
    "graph_metadata",
    "require_onnx",
]

#: The ONNX opsets :func:`export_model` writes (first, last).
OPSETS = (18, 22)
INPUT_NAMES = (*MODALITIES, "cam_ids")
OUTPUT_NAMES = ("feature", "token_mask")
#: What :func:`graph_metadata` writes into the file's ``metadata_props``; every value is JSON text.
METADATA_KEYS = (
    "editor_reid.format",
    "editor_reid.version",
    "editor_reid.config",
    "editor_reid.feature_dim",
    "editor_reid.num_cameras",
    "editor_reid.fingerprint",
    "editor_reid.modalities",
    "editor_reid.input_size",
    "editor_reid.pixel_mean",
    "editor_reid.pixel_std",
)
FORMAT_VERSION = 1
_EXAMPLE_BATCH = 2  # traced with 2 samples; the batch axis is symbolic (1 would be specialised)
_MAX_BATCH = 1 << 16


class OnnxUnavailableError(EditorReidError, ImportError):
    """An optional ONNX package (onnx, onnxscript, onnxruntime) is not installed."""


def require_onnx(module: str, purpose: str = "ONNX export"):
    """Import ``module`` of the ``onnx`` extra, or raise :class:`OnnxUnavailableError` in one line."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OnnxUnavailableError(f"{purpose} needs the Python package '{module}', which cannot be imported "
                                   f"({exc}); install the ONNX extra: pip install \"editor-reid[onnx]\"") from None


def _masked_block(block: nn.Module, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """An HMA :class:`~editor_reid.model.hma.MaskedBlock` on the full-length sequence: x [B, L, D]
    (zero at dropped positions), valid [B, L] bool -> [B, L, D], still zero there.

    The normalised rows are masked before every bias-free projection, attention has a key mask
    and zeroes dropped queries, and the MLP maps zero to zero: the official masked block."""
    keep = valid.unsqueeze(-1).to(x.dtype)
    x = x + block.attn(block.norm1(x) * keep, valid)
    return x + block.mlp(block.norm2(x) * keep)


class ExportGraph(nn.Module):
    """EDITOR's evaluation forward on fixed-length, masked sequences (see the module docstring).

    ``forward(RGB, NI, TI, cam_ids) -> (feature [B, 3D], token_mask [B, N])``. Shares its
    modules with ``model`` (no copy); equal to ``model(images, cam_ids)`` in eval mode up to
    float summation order.
    """

    def __init__(self, model: EDITOR) -> None:
        super().__init__()
        self.model = model

    def _backbone(self, images: torch.Tensor, cam_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All tokens and the rollout row: images [M·B, 3, H, W] -> ([M·B, 1+N, D], [M·B, h, N])."""
        backbone = self.model.backbone
        cams = cam_ids.repeat(len(MODALITIES)) if backbone.sie_embed is not None else None
        x = backbone.embed(images, cams)
        maps = []
        for block in _timm.blocks(backbone.vit):
            attn = _timm.attention_parts(block)
            h = attn.norm1(x)
            q, k, v = attn.qkv(h).unflatten(-1, (3, attn.num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
            probs = torch.softmax((attn.q_norm(q) @ attn.k_norm(k).transpose(-2, -1)) * attn.scale, dim=-1)
            maps.append(probs)  # [M·B, h, L, L]
            x = _timm.finish_block(block, x, h, (attn.attn_drop(probs) @ v).transpose(1, 2))
        return _timm.final_norm(backbone.vit, x), rollout_cls_row(maps)

    def _hma(self, tokens: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """f_HMA [B, 3D] from the backbone tokens per modality and M_U [B, N]."""
        hma = self.model.hma
        valid = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)  # [B, L]: CLS + selected
        stage1 = [_masked_block(hma.modal_blocks[m], apply_token_mask(x, mask), valid)
                  for m, x in zip(hma.modalities, tokens)]
        joint_valid = valid.repeat(1, len(stage1))
        joint = _masked_block(hma.fusion_block, torch.cat(stage1, dim=1), joint_valid)
        joint = hma.out_norm(joint) * joint_valid.unsqueeze(-1).to(joint.dtype)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(joint.dtype)  # |M_U|
        length = valid.shape[1]
        features = []
        for index, m in enumerate(hma.modalities):
            part = joint[:, index * length : (index + 1) * length]
            features.append(hma.reduce[m](torch.cat([part[:, 0], part[:, 1:].sum(dim=1) / count], dim=-1)))
        return torch.cat(features, dim=-1)

    def forward(self, rgb: torch.Tensor, ni: torch.Tensor, ti: torch.Tensor,
                cam_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        images = [rgb, ni, ti]
        num_mod = len(images)
        out, row = self._backbone(torch.cat(images, dim=0), cam_ids)
        # Per-modality views by reshaping, not by splitting at B: a split would pin the batch size.
        tokens = list(out.unflatten(0, (num_mod, -1)).unbind(0))  # M × [B, 1+N, D]
        if model.use_sfts:
            mask = model.sfts(list(row.unflatten(0, (num_mod, -1)).unbind(0)), images)  # [B, N]
        else:
            mask = torch.ones(rgb.shape[0], model.num_patches, dtype=torch.bool, device=rgb.device)
        if model.hma is None:
            return torch.cat([t[:, 0] for t in tokens], dim=-1), mask
        return self._hma(tokens, mask), mask


def graph_metadata(model: EDITOR, cfg: Config, fingerprint: str | None = None) -> dict[str, str]:
    """The ``metadata_props`` of an exported graph (:data:`METADATA_KEYS`), values as JSON text.

    ``fingerprint`` defaults to :func:`~editor_reid.features.store.model_fingerprint` of the
    model's state dict (what :class:`~editor_reid.features.extractor.FeatureExtractor` reports).
    """
    from editor_reid.features.store import model_fingerprint

    sie = model.backbone.sie_embed
    values = {
        "editor_reid.format": FORMAT_VERSION,
        "editor_reid.version": editor_reid.__version__,
        "editor_reid.config": config_to_dict(cfg),
        "editor_reid.feature_dim": model.feat_dim,
        "editor_reid.num_cameras": None if sie is None else int(sie.shape[0]),
        "editor_reid.fingerprint": fingerprint or model_fingerprint(model.state_dict()),
        "editor_reid.modalities": [m for m in MODALITIES if m in cfg.datasets.modalities],
        "editor_reid.input_size": list(cfg.input.size_test),
        "editor_reid.pixel_mean": list(cfg.input.pixel_mean),
        "editor_reid.pixel_std": list(cfg.input.pixel_std),
    }
    return {key: json.dumps(value) for key, value in values.items()}


def export_model(model: EDITOR, cfg: Config, out: str | Path, *, opset: int | None = None,
                 fingerprint: str | None = None) -> Path:
    """Write ``model`` (moved to the CPU, eval mode) as an ONNX graph with a dynamic batch to
    ``out``, atomically, with :func:`graph_metadata`. ``opset``: the ONNX opset, in :data:`OPSETS`
    (default: the exporter's choice; 20 with torch 2.14). Returns ``out``."""
    require_onnx("onnx")
    require_onnx("onnxscript")
    if opset is not None and not OPSETS[0] <= opset <= OPSETS[1]:
        raise UsageError(f"opset {opset} is not supported: choose one in [{OPSETS[0]}, {OPSETS[1]}] (the exporter "
                         "writes 18 or newer; from 23 HMA's masked attention becomes an Attention node that "
                         "onnxruntime's CPU kernel does not run with a key mask)")
    if tuple(model.modalities) != MODALITIES:
        raise UsageError(f"the ONNX graph takes the inputs {', '.join(MODALITIES)}; this model's modalities are "
                         f"{', '.join(model.modalities)} (datasets.modalities), which export does not support yet: "
                         "use the checkpoint with FeatureExtractor or editor-reid extract")
    out = Path(out)
    model = model.to("cpu").eval()
    height, width = model.backbone.img_size
    example = tuple(torch.zeros(_EXAMPLE_BATCH, 3, height, width) for _ in MODALITIES)
    example += (torch.zeros(_EXAMPLE_BATCH, dtype=torch.long),)
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    dynamic = {"rgb": {0: batch}, "ni": {0: batch}, "ti": {0: batch}, "cam_ids": {0: batch}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's notes on tracing, not the user's concern
        program = torch.onnx.export(ExportGraph(model).eval(), example, dynamo=True, verbose=False,
                                    input_names=list(INPUT_NAMES), output_names=list(OUTPUT_NAMES),
                                    dynamic_shapes=dynamic, opset_version=opset)
    program.model.metadata_props.update(graph_metadata(model, cfg, fingerprint))
    atomic_write(out, lambda tmp: program.save(tmp, external_data=False))
    return out


def export_onnx(weights: str | Path, out: str | Path, *, config: Config | str | Path | None = None,
                opset: int | None = None, sfts_ties: str | None = None, quiet: bool = False) -> Path:
    """``editor-reid export --format onnx``: the model of ``weights`` (an editor-reid checkpoint,
    or an official ``.pth`` / plain state dict with ``config``, as for
    :class:`~editor_reid.features.extractor.FeatureExtractor`) written to ``out``. ``sfts_ties``
    replaces the model's ``model.sfts_ties`` (only tied top-k boundaries change). Returns ``out``."""
    require_onnx("onnx")
    require_onnx("onnxscript")
    from editor_reid.features.extractor import FeatureExtractor

    extractor = FeatureExtractor(weights, config, device="cpu")
    model = getattr(extractor.model, "_orig_mod", extractor.model)  # the eager model under torch.compile
    if sfts_ties is not None:
        SFTS(ties=sfts_ties)  # validates the name
        model.sfts.ties = extractor.cfg.model.sfts_ties = sfts_ties
    out = export_model(model, extractor.cfg, out, opset=opset, fingerprint=extractor.fingerprint)
    if not quiet:
        height, width = model.backbone.img_size
        size = out.stat().st_size / 2**20
        print(f"export: wrote '{out}' ({size:.1f} MiB, ONNX; inputs {', '.join(INPUT_NAMES)} at {height}x{width}, "
              f"dynamic batch; feature {model.feat_dim}-d; fingerprint {extractor.fingerprint})")
        if model.use_sfts and model.sfts.ties == "torch":
            print("export: note: model.sfts_ties is 'torch' (the official rule); where SFTS scores tie at the top-k "
                  "cut-off, onnxruntime keeps the lower patch index and the feature can differ from PyTorch's. "
                  "model.sfts_ties=lower_index makes the two agree on every input (docs/export.md#token-selection)")
    return out
