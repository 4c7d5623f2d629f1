"""EDITOR model: shared ViT backbone -> SFTS -> HMA -> heads.

Files: ``backbone.py`` (timm ViT + SIE + attention capture), ``sfts.py`` (token selection, Haar
DWT), ``hma.py`` (masked aggregation), ``editor.py`` (assembly, heads, ``build_model``),
``pretrained.py`` (local pretrained weights), ``official.py`` (official checkpoint layout),
``_timm.py`` (the timm internals the backbone and the pretrained loader rely on).
The model never imports the engine, data, logging or CLI layers.
"""

from editor_reid.model.backbone import UNKNOWN_CAMERA, BackboneOutput, ViTBackbone, build_backbone, rollout_cls_row
from editor_reid.model.editor import (
    EDITOR,
    EditorEvalOutput,
    EditorTrainOutput,
    SelectionMaps,
    build_model,
    count_parameters,
)
from editor_reid.model.hma import HMA, HMAOutput
from editor_reid.model.official import (
    LoadReport,
    OfficialCheckpointError,
    is_official_state_dict,
    load_official_checkpoint,
    official_key,
    official_model_sizes,
    official_to_ours,
    to_official_state_dict,
)
from editor_reid.model.pretrained import PretrainedLoadError, PretrainedReport, filter_pretrained, load_pretrained
from editor_reid.model.sfts import SFTS, apply_token_mask, haar_dwt2, haar_idwt2, select_tokens

__all__ = [
    "EDITOR",
    "HMA",
    "SFTS",
    "BackboneOutput",
    "UNKNOWN_CAMERA",
    "EditorEvalOutput",
    "EditorTrainOutput",
    "HMAOutput",
    "LoadReport",
    "OfficialCheckpointError",
    "PretrainedLoadError",
    "PretrainedReport",
    "SelectionMaps",
    "ViTBackbone",
    "apply_token_mask",
    "build_backbone",
    "build_model",
    "count_parameters",
    "filter_pretrained",
    "haar_dwt2",
    "haar_idwt2",
    "is_official_state_dict",
    "load_official_checkpoint",
    "load_pretrained",
    "official_key",
    "official_model_sizes",
    "official_to_ours",
    "rollout_cls_row",
    "select_tokens",
    "to_official_state_dict",
]
