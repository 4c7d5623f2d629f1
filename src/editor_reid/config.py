"""Typed configuration: dataclass sections, YAML presets, dotted overrides, validation.

Keys mirror the official yacs names in lower case (``MODEL.HEAD_KEEP`` -> ``model.head_keep``)
so users of the official EDITOR code find their way. Every value is type-checked; an unknown
key names the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from editor_reid.data.layouts import DATASET_NAMES
from editor_reid.errors import UsageError
from editor_reid.modalities import MODALITIES

__all__ = [
    "Config",
    "ConfigError",
    "ModelConfig",
    "InputConfig",
    "DatasetsConfig",
    "DataloaderConfig",
    "SolverConfig",
    "TestConfig",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "dump_config",
    "AMP_CHOICES",
]

#: solver.amp: fp32, fp16 autocast with loss scaling (CUDA), bf16 autocast (CUDA or CPU).
AMP_CHOICES = ("none", "fp16", "bf16")


class ConfigError(UsageError, ValueError):
    """A configuration file, key or value is invalid."""


@dataclass
class ModelConfig:
    name: str = "editor"
    # Backbone (timm VisionTransformer definitions).
    transformer_type: str = "vit_base_patch16_224"  # or "vit_base_patch16_clip_224", "vit_tiny_test"
    pretrain_choice: str = "imagenet"  # "imagenet" | "clip" | "none"
    pretrain_path: str = ""  # local weight file; empty = random init
    # Width / depth / heads overrides for small test and demo models (0 = architecture default).
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    stride_size: list[int] = field(default_factory=lambda: [16, 16])
    drop_path: float = 0.1
    drop_out: float = 0.0
    att_drop_rate: float = 0.0
    sie_camera: bool = True
    sie_coe: float = 3.0
    # SFTS
    sfts: bool = True  # False: keep every token (ablation rows A/B)
    head_keep: int = 2
    frequency_keep: int = 10
    frequency_mode: str = "official"  # "official" | "highpass"
    # HMA
    hma: bool = True  # False: plain concatenation of the backbone CLS tokens
    hma_heads: int = 0  # 0 = same as the backbone
    # Supervision setting: 1 = "A" (AL head on concatenated CLS), 0 = "B" (shared per-modality head)
    al: int = 1
    # Losses
    bcc: bool = True
    ocfr: bool = True
    ocfr_momentum: float = 0.8
    ocfr_weight: float = 1.0
    bcc_weight: float = 1.0
    id_loss_weight: float = 1.0
    triplet_loss_weight: float = 1.0
    if_labelsmooth: bool = True
    label_smooth_eps: float = 0.1
    no_margin: bool = True  # soft-margin triplet (official); False uses solver.margin
    triplet_scope: str = "global"  # "global" | "local": batch-hard mining over all ranks or per rank
    ocfr_scope: str = "global"  # "global" | "local": OCFR centre updates from the global batch or per rank
    sync_bn: bool = False  # convert the BatchNorm necks to SyncBatchNorm under DDP
    compile: bool = False  # torch.compile the model (CUDA)


@dataclass
class InputConfig:
    size_train: list[int] = field(default_factory=lambda: [256, 128])  # H, W
    size_test: list[int] = field(default_factory=lambda: [256, 128])
    prob: float = 0.5  # horizontal flip
    re_prob: float = 0.5  # random erasing
    padding: int = 10
    pixel_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    pixel_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    # "independent" (official: each modality draws its own randomness) or "synchronized"
    # (one geometric draw shared by the three modalities).
    aug_mode: str = "independent"


@dataclass
class DatasetsConfig:
    names: str = "rgbnt201"  # "rgbnt201" | "rgbnt100" | "msvr310" | "market1501mm"
    root_dir: str = "./data"
    skip_bad_images: bool = False
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))


@dataclass
class DataloaderConfig:
    sampler: str = "softmax_triplet"
    num_instance: int = 16
    num_workers: int = 4


@dataclass
class SolverConfig:
    optimizer_name: str = "SGD"  # "SGD" | "AdamW"
    max_epochs: int = 70
    base_lr: float = 0.001
    bias_lr_factor: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_bias: float = 1e-4
    ims_per_batch: int = 128
    warmup_iters: int = 10  # epochs, as in the official schedule
    warmup_factor: float = 0.01
    eta_min_factor: float = 0.001  # cosine floor = base_lr * eta_min_factor
    margin: float = 0.3
    seed: int = 1111
    amp: str = "none"  # "none" | "fp16" | "bf16"
    checkpoint_period: int = 60
    checkpoint_steps: int = 0  # also write checkpoints/last.pt every N steps inside an epoch (0 = epoch ends only)
    log_period: int = 10
    eval_period: int = 1
    max_steps_per_epoch: int = 0  # 0 = full epoch; >0 caps iterations (demo, smoke tests)
    deterministic: bool = False
    tensorboard: bool = False  # also write TensorBoard scalars (needs the `tensorboard` extra)


@dataclass
class TestConfig:
    ims_per_batch: int = 128
    re_ranking: bool = False
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    feat_norm: bool = True
    distance: str = "euclidean"  # "euclidean" | "cosine"
    weight: str = ""
    max_rank: int = 50


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    input: InputConfig = field(default_factory=InputConfig)
    datasets: DatasetsConfig = field(default_factory=DatasetsConfig)
    dataloader: DataloaderConfig = field(default_factory=DataloaderConfig)
    solver: SolverConfig = field(default_factory=SolverConfig)
    test: TestConfig = field(default_factory=TestConfig)
    output_dir: str = "./runs/editor"


_CHOICES: dict[str, tuple[str, ...]] = {
    "model.pretrain_choice": ("imagenet", "clip", "none"),
    "model.frequency_mode": ("official", "highpass"),
    "model.triplet_scope": ("global", "local"),
    "model.ocfr_scope": ("global", "local"),
    "input.aug_mode": ("independent", "synchronized"),
    "datasets.names": DATASET_NAMES,
    "solver.optimizer_name": ("SGD", "AdamW"),
    "solver.amp": AMP_CHOICES,
    "test.distance": ("euclidean", "cosine"),
}


def _closest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(candidates))}"


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list of {item_type.__name__}, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}': expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise ConfigError(f"config key '{key}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{key}': unsupported type {annotation}")  # pragma: no cover


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _hints(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node: Any = cfg
    walked: list[str] = []
    for i, part in enumerate(parts):
        fields = _fields(node)
        if part not in fields:
            prefix = ".".join(walked)
            candidates = [f"{prefix}.{n}" if prefix else n for n in fields]
            full = ".".join(walked + [part])
            # Suggest among all leaf keys too, which catches a key put in the wrong section.
            hint = _closest(full, candidates + list(_all_keys(cfg)))
            raise ConfigError(f"{source}: unknown config key '{dotted}'{hint}")
        walked.append(part)
        child = getattr(node, part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(child):
                if not isinstance(value, dict):
                    raise ConfigError(f"{source}: config key '{dotted}' is a section; expected a mapping, got {value!r}")
                for k, v in value.items():
                    _set(cfg, f"{dotted}.{k}", v, source)
                return
            converted = _check_value(dotted, value, _hints(node)[part])
            choices = _CHOICES.get(dotted)
            if choices is not None:
                if isinstance(converted, str) and converted not in choices:
                    lowered = {c.lower(): c for c in choices}
                    if converted.lower() in lowered:
                        converted = lowered[converted.lower()]
                    else:
                        raise ConfigError(
                            f"{source}: config key '{dotted}': {converted!r} is not one of {', '.join(choices)}"
                        )
            setattr(node, part, converted)
            return
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{source}: config key '{'.'.join(walked)}' is a value, not a section (in '{dotted}')")
        node = child


def _all_keys(node: Any, prefix: str = ""):
    for name, _ in _fields(node).items():
        child = getattr(node, name)
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(child):
            yield from _all_keys(child, key + ".")
        else:
            yield key


def _normalise_keys(data: Any) -> Any:
    """Lower-case mapping keys so official yacs spellings (``MODEL: {HEAD_KEEP: 2}``) load too."""
    if isinstance(data, dict):
        return {str(k).lower(): _normalise_keys(v) for k, v in data.items()}
    return data


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply ``key=value`` overrides in place; values are parsed as YAML (``a.b=[1,2]``)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected KEY=VALUE, e.g. solver.base_lr=0.002")
        key, raw = item.split("=", 1)
        key = key.strip().lower()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML ({exc})") from exc
        _set(cfg, key, value, "override")
    _validate(cfg)
    return cfg


def _validate(cfg: Config) -> None:
    for section, key in (("input", "size_train"), ("input", "size_test")):
        size = getattr(getattr(cfg, section), key)
        if len(size) != 2 or min(size) <= 0:
            raise ConfigError(f"config key '{section}.{key}': expected [height, width] > 0, got {size}")
    if cfg.input.size_train != cfg.input.size_test:
        raise ConfigError(
            f"config keys 'input.size_train' {cfg.input.size_train} and 'input.size_test' {cfg.input.size_test} "
            "must be equal (the patch grid and positional embedding are fixed at build time)"
        )
    if len(cfg.model.stride_size) != 2:
        raise ConfigError(f"config key 'model.stride_size': expected two integers, got {cfg.model.stride_size}")
    bad = [m for m in cfg.datasets.modalities if m not in MODALITIES]
    if bad or not cfg.datasets.modalities:
        raise ConfigError(
            f"config key 'datasets.modalities': expected a non-empty subset of {list(MODALITIES)}, got {cfg.datasets.modalities}"
        )
    if cfg.dataloader.num_instance <= 0 or cfg.solver.ims_per_batch % cfg.dataloader.num_instance:
        raise ConfigError(
            f"config key 'solver.ims_per_batch' ({cfg.solver.ims_per_batch}) must be a multiple of "
            f"'dataloader.num_instance' ({cfg.dataloader.num_instance})"
        )
    if cfg.model.head_keep < 0 or cfg.model.frequency_keep < 0:
        raise ConfigError("config keys 'model.head_keep' and 'model.frequency_keep' must be >= 0")
    if cfg.model.al not in (0, 1):
        raise ConfigError(f"config key 'model.al': expected 0 or 1, got {cfg.model.al}")


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    cfg = Config()
    data = _normalise_keys(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    for key, value in data.items():
        _set(cfg, key, value, source)
    _validate(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (or the defaults when ``path`` is None) and apply dotted overrides."""
    if path is None:
        cfg = Config()
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}': expected a mapping at the top level")
        cfg = config_from_dict(data, source=str(path))
    return apply_overrides(cfg, overrides)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

