"""Typed configuration: dataclass sections, YAML presets, dotted overrides, validation.

Keys mirror the official yacs names in lower case (``MODEL.HEAD_KEEP`` -> ``model.head_keep``)
so users of the official EDITOR code find their way. Every value is type-checked and every
number range-checked (:data:`_RULES`, :data:`_RELATIONS`) whenever a configuration is loaded,
so a bad value stops a command before it writes anything; an unknown key names the same key in
another section, or else the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import operator
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from editor_reid.data.layouts import DATASET_NAMES, MANIFEST, PROTOCOLS
from editor_reid.errors import UsageError
from editor_reid.modalities import MODALITIES, canonical_order, check_modalities

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
    "resolve_config_path",
    "PRESET_DIR",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "dump_config",
    "validate_config",
    "AMP_CHOICES",
    "MAX_SEED",
]

#: solver.amp: fp32, fp16 autocast with loss scaling (CUDA), bf16 autocast (CUDA or CPU).
AMP_CHOICES = ("none", "fp16", "bf16", "auto")

#: The largest seed: NumPy's global generator takes 32-bit seeds.
MAX_SEED = 2**32 - 1


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
    sie_tokens: str = "all"  # "all" (EDITOR: every token) | "cls" (the CLIP ReID papers: the class token only)
    # SFTS
    sfts: bool = True  # False: keep every token (ablation rows A/B)
    head_keep: int = 2
    frequency_keep: int = 10
    frequency_mode: str = "official"  # "official" | "highpass"
    sfts_ties: str = "torch"  # "torch" (as the official code) | "lower_index" (the same on every device and in ONNX)
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
    grad_checkpointing: bool = False  # recompute backbone and HMA blocks in the backward pass: less memory, more time
    lean_mlp: bool = True  # MLPs keep their GELU input, not its output, for the backward pass (same gradients)


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
    names: str = "rgbnt201"  # "rgbnt201" | "rgbnt100" | "msvr310" | "market1501mm" | "rgbn300" | "wmveid863" | "manifest"
    root_dir: str = "./data"
    # The CSV file that lists the samples when names is "manifest" (relative to the current directory).
    manifest: str = ""
    protocol: str = ""  # empty = the dataset's own protocol; "same_camera" or "same_scene" replaces it
    skip_bad_images: bool = False
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))


@dataclass
class DataloaderConfig:
    sampler: str = "softmax_triplet"
    num_instance: int = 16
    num_workers: int = 4


@dataclass
class SolverConfig:
    optimizer_name: str = "SGD"  # "SGD" | "Adam" | "AdamW"
    max_epochs: int = 70
    base_lr: float = 0.001
    backbone_lr: float = 0.0  # >0: the pretrained ViT's tensors (weights and biases) train at this LR (docs/clip.md)
    bias_lr_factor: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_bias: float = 1e-4
    ims_per_batch: int = 128
    warmup_iters: int = 10  # epochs, as in the official schedule
    warmup_factor: float = 0.01
    eta_min_factor: float = 0.001  # cosine floor = base_lr * eta_min_factor
    lr_noise: float = 0.0  # >0: timm's LR noise (noise_pct) on every epoch, as the CLIP ReID recipes (docs/clip.md)
    lr_noise_seed: int = 42  # epoch t draws its LR noise from a generator seeded lr_noise_seed + t
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
    "model.sfts_ties": ("torch", "lower_index"),
    "model.triplet_scope": ("global", "local"),
    "model.ocfr_scope": ("global", "local"),
    "model.sie_tokens": ("all", "cls"),
    "input.aug_mode": ("independent", "synchronized"),
    "datasets.names": DATASET_NAMES,
    "datasets.protocol": ("", *PROTOCOLS),
    "solver.optimizer_name": ("SGD", "Adam", "AdamW"),
    "solver.amp": AMP_CHOICES,
    "test.distance": ("euclidean", "cosine"),
}


@dataclass(frozen=True)
class Bound:
    """The valid values of one numeric key (of each element, for a list key).

    Every float must also be finite, with or without a bound. Integer literals mean an integer
    key (``Bound(0, 1)`` reads "0 or 1"), float literals a real interval (``Bound(0.0, 1.0)``
    reads "in [0, 1]").
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # True: ``low`` itself is refused ("> 0" rather than ">= 0")
    high_open: bool = False
    multiple: int = 1  # the value must also be a multiple of this (input sizes: the 16-pixel patch)
    length: int | None = None  # list keys: the exact number of elements

    def admits(self, number: float) -> bool:
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            return False
        if self.high is not None and (number > self.high or (self.high_open and number == self.high)):
            return False
        return self.multiple == 1 or number % self.multiple == 0

    def describe(self) -> str:
        """One value's range in words: ">= 1", "> 0", "in [0, 1)", "0 or 1", "a positive multiple of 16"."""
        low, high = _number(self.low), _number(self.high)
        if self.multiple > 1 and self.low == self.multiple and self.high is None:
            return f"a positive multiple of {self.multiple}"
        if self.low is not None and self.high is not None:
            if self.low == self.high:
                return low
            if isinstance(self.low, int) and self.high == self.low + 1:
                return f"{low} or {high}"
            return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {low}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {high}"
        return "any finite number"

    def text(self) -> str:
        """The whole rule, list length included: "2 values, each a positive multiple of 16"."""
        if self.length is None:
            return self.describe()
        if self.low is None and self.high is None and self.multiple == 1:
            return f"{self.length} finite numbers"
        return f"{self.length} values, each {self.describe()}"


def _number(x: float | None) -> str:
    return "" if x is None else (str(int(x)) if float(x).is_integer() else repr(x))


_AT_LEAST_0 = Bound(0)
_AT_LEAST_1 = Bound(1)
_POSITIVE = Bound(0.0, low_open=True)
_NON_NEGATIVE = Bound(0.0)
_PROBABILITY = Bound(0.0, 1.0)
_IMAGE_SIZE = Bound(16, multiple=16, length=2)  # [H, W] in whole 16x16 patches

#: The valid range of every numeric key, checked whenever a configuration is loaded; the
#: documentation's reference table shows them. A numeric key missing here is a test failure.
_RULES: dict[str, Bound] = {
    "model.embed_dim": _AT_LEAST_0,  # 0 = architecture default
    "model.depth": _AT_LEAST_0,
    "model.num_heads": _AT_LEAST_0,
    "model.stride_size": Bound(16, 16, length=2),  # only non-overlapping 16x16 patches are built
    "model.drop_path": _PROBABILITY,
    "model.drop_out": _PROBABILITY,
    "model.att_drop_rate": _PROBABILITY,
    "model.sie_coe": Bound(),
    "model.head_keep": _AT_LEAST_0,
    "model.frequency_keep": _AT_LEAST_0,
    "model.hma_heads": _AT_LEAST_0,
    "model.al": Bound(0, 1),
    "model.ocfr_momentum": _PROBABILITY,
    "model.ocfr_weight": _NON_NEGATIVE,  # a negative loss weight would maximise the loss
    "model.bcc_weight": _NON_NEGATIVE,
    "model.id_loss_weight": _NON_NEGATIVE,
    "model.triplet_loss_weight": _NON_NEGATIVE,
    "model.label_smooth_eps": _PROBABILITY,
    "input.size_train": _IMAGE_SIZE,
    "input.size_test": _IMAGE_SIZE,
    "input.prob": _PROBABILITY,
    "input.re_prob": _PROBABILITY,
    "input.padding": _AT_LEAST_0,
    "input.pixel_mean": Bound(length=3),  # one per RGB channel, shared by every modality
    "input.pixel_std": Bound(0.0, low_open=True, length=3),  # divides: 0 would give inf
    "dataloader.num_instance": _AT_LEAST_1,
    "dataloader.num_workers": _AT_LEAST_0,
    "solver.max_epochs": _AT_LEAST_1,
    "solver.base_lr": _POSITIVE,
    "solver.backbone_lr": _NON_NEGATIVE,  # 0 = the backbone follows base_lr / bias_lr_factor
    "solver.bias_lr_factor": _NON_NEGATIVE,  # 0 freezes the biases
    "solver.momentum": Bound(0.0, 1.0, high_open=True),  # 1 would never forget a gradient
    "solver.weight_decay": _NON_NEGATIVE,
    "solver.weight_decay_bias": _NON_NEGATIVE,
    "solver.ims_per_batch": _AT_LEAST_1,
    "solver.warmup_iters": _AT_LEAST_0,
    "solver.warmup_factor": _POSITIVE,
    "solver.eta_min_factor": _NON_NEGATIVE,
    "solver.lr_noise": Bound(0.0, 1.0, high_open=True),  # timm's noise_pct: |noise| < lr_noise, so the LR stays > 0
    "solver.lr_noise_seed": Bound(0, MAX_SEED),
    "solver.margin": _NON_NEGATIVE,
    "solver.seed": Bound(0, MAX_SEED),
    "solver.checkpoint_period": _AT_LEAST_0,  # 0 = never
    "solver.checkpoint_steps": _AT_LEAST_0,
    "solver.log_period": _AT_LEAST_0,
    "solver.eval_period": _AT_LEAST_0,
    "solver.max_steps_per_epoch": _AT_LEAST_0,
    "test.ims_per_batch": _AT_LEAST_1,
    "test.rerank_k1": _AT_LEAST_1,
    "test.rerank_k2": _AT_LEAST_1,
    "test.rerank_lambda": _PROBABILITY,
    "test.max_rank": _AT_LEAST_1,
}


def _multiple(a: int, b: int) -> bool:
    return a % b == 0


def _multiple_when_set(a: int, b: int) -> bool:
    return a == 0 or b == 0 or a % b == 0  # 0 = the architecture's default, checked when the model is built


@dataclass(frozen=True)
class Relation:
    """A rule between two keys, checked once each key is in its own range."""

    first: str
    second: str
    holds: Callable[[Any, Any], bool]
    phrase: str  # "<first> must be <phrase> <second>"
    why: str


#: The rules that tie two keys together; the reference table shows them next to ``first``.
_RELATIONS: tuple[Relation, ...] = (
    Relation("input.size_train", "input.size_test", operator.eq, "equal to",
             "the patch grid and positional embedding are fixed when the model is built"),
    Relation("solver.ims_per_batch", "dataloader.num_instance", _multiple, "a multiple of",
             "a batch holds P identities with K images each"),
    Relation("model.embed_dim", "model.num_heads", _multiple_when_set, "divisible by",
             "each attention head takes embed_dim / num_heads channels"),
    Relation("model.embed_dim", "model.hma_heads", _multiple_when_set, "divisible by",
             "each HMA head takes embed_dim / hma_heads channels"),
)


def _shorten(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters, so that a message stays one readable line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    try:
        return _shorten(repr(value))
    except ValueError:  # an integer too long for str() (over 4300 digits)
        return "<a very long integer>"


def _closest(name: str, candidates: list[str]) -> str:
    match = difflib.get_close_matches(name, candidates, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(candidates))}"


def _unknown_key_hint(dotted: str, candidates: list[str], all_keys: list[str]) -> str:
    """The same key name in another section first (``model.base_lr`` -> ``solver.base_lr``),
    then the closest spelling."""
    leaf = dotted.rsplit(".", 1)[-1]
    elsewhere = [key for key in all_keys if key.rsplit(".", 1)[-1] == leaf and key != dotted]
    if elsewhere:
        return "; did you mean " + " or ".join(f"'{key}'" for key in elsewhere) + "?"
    return _closest(dotted, candidates + all_keys)


def _check_value(key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` converted to ``annotation`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list of {item_type.__name__}, got {_show(value)}")
        return [_check_value(f"{key}[{i}]", v, item_type) for i, v in enumerate(value)]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected true/false, got {_show(value)}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}': expected an integer, got {_show(value)}")
    if annotation is float:
        number = _as_float(value)
        if number is None:
            raise ConfigError(f"config key '{key}': expected a number, got {_show(value)}")
        # NaN or inf would slip through every range check (NaN compares false) and poison training.
        if not math.isfinite(number):
            raise ConfigError(f"config key '{key}': expected a finite number, got {_show(value)}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise ConfigError(f"config key '{key}': expected a string, got {_show(value)}")
    raise ConfigError(f"config key '{key}': unsupported type {annotation}")  # pragma: no cover


def _as_float(value: Any) -> float | None:
    """``value`` as a float (inf for an integer beyond the float range), None when it is no number."""
    if isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
        except ValueError:
            return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _check_bound(key: str, value: Any, bound: Bound) -> None:
    values = value if isinstance(value, list) else [value]
    wrong_length = bound.length is not None and len(values) != bound.length
    if wrong_length or not all(bound.admits(v) for v in values):
        hint = "" if wrong_length else _nearest_multiples(value, bound)
        raise ConfigError(f"config key '{key}': expected {bound.text()}, got {_show(value)}{hint}")


def _nearest_multiples(value: Any, bound: Bound) -> str:
    """"; nearest valid: [96, 48] or [112, 64]" for a key that holds multiples (input sizes)."""
    if bound.multiple == 1:
        return ""
    step = bound.multiple
    lowest = int(bound.low) if bound.low is not None else step
    values = value if isinstance(value, list) else [value]
    down = [max(lowest, int(v) // step * step) for v in values]
    up = [max(lowest, -(-int(v) // step) * step) for v in values]
    shown = [down] if down == up else [down, up]
    if not isinstance(value, list):
        shown = [s[0] for s in shown]
    return "; nearest valid: " + " or ".join(str(s) for s in shown)


def _fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _hints(obj: Any) -> dict[str, Any]:
    return _type_hints(type(obj))


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)  # evaluates the string annotations: once per class


def _get(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
    """Set one (dotted) key; ``source`` is the file's name, or "" for a command-line override."""
    where = f"{source}: " if source else ""
    parts = dotted.split(".")
    node: Any = cfg
    walked: list[str] = []
    for i, part in enumerate(parts):
        fields = _fields(node)
        if part not in fields:
            prefix = ".".join(walked)
            candidates = [f"{prefix}.{n}" if prefix else n for n in fields]
            hint = _unknown_key_hint(dotted, candidates, list(_all_keys(cfg)))
            raise ConfigError(f"{where}unknown config key '{_shorten(dotted)}'{hint}")
        walked.append(part)
        child = getattr(node, part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(child):
                if not isinstance(value, dict):
                    raise ConfigError(
                        f"{where}config key '{dotted}' is a section; expected a mapping, got {_show(value)}"
                    )
                for k, v in value.items():
                    _set(cfg, f"{dotted}.{k}", v, source)
                return
            try:
                converted = _check_value(dotted, value, _hints(node)[part])
            except ConfigError as exc:
                raise ConfigError(f"{where}{exc}") from None
            setattr(node, part, _canonical_choice(dotted, converted, where))
            return
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"{where}config key '{'.'.join(walked)}' is a value, not a section (in '{dotted}')")
        node = child


def _listed(choices: tuple[str, ...]) -> str:
    """"none, fp16, bf16"; the empty choice shown as ''."""
    return ", ".join(choice or "''" for choice in choices)


def _canonical_choice(key: str, value: Any, where: str) -> Any:
    """``value`` spelled as in ``_CHOICES`` (the case does not matter: ``adamw`` -> ``AdamW``)."""
    choices = _CHOICES.get(key)
    if choices is None or not isinstance(value, str) or value in choices:
        return value
    lowered = {c.lower(): c for c in choices}
    if value.lower() in lowered:
        return lowered[value.lower()]
    raise ConfigError(f"{where}config key '{key}': {_show(value)} is not one of {_listed(choices)}")


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


def _yaml_problem(exc: Exception) -> str:
    """A YAML error in one line: what is wrong and where (PyYAML's own text spans several lines)."""
    problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or str(exc)
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())


def apply_overrides(cfg: Config, overrides: list[str] | None) -> Config:
    """Apply ``key=value`` overrides in place; values are parsed as YAML (``a.b=[1,2]``)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {_show(item)}: expected KEY=VALUE, e.g. solver.base_lr=0.002")
        key, raw = item.split("=", 1)
        key = key.strip().lower()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        # PyYAML raises ValueError on text it cannot build (a date such as 2024-02-30, an
        # integer of over 4300 digits): the user's text, not a bug.
        except (yaml.YAMLError, ValueError) as exc:
            raise ConfigError(f"override {_show(item)}: value is not valid YAML: {_yaml_problem(exc)}") from exc
        _set(cfg, key, _normalise_keys(value), source="")
    validate_config(cfg)
    return cfg


def validate_config(cfg: Config) -> None:
    """Raise ConfigError naming the first invalid key: its type, its choices, its range
    (:data:`_RULES`), then the rules between keys (:data:`_RELATIONS`).

    Loading runs this; call it after setting attributes by hand. Each value is stored back in
    its declared type (an integer set on a float key becomes a float), as loading stores it.
    """
    for key in _all_keys(cfg):
        section, _, name = key.rpartition(".")
        owner = _get(cfg, section) if section else cfg
        value = _check_value(key, getattr(owner, name), _hints(owner)[name])
        setattr(owner, name, value)
        if _CHOICES.get(key) and value not in _CHOICES[key]:
            raise ConfigError(f"config key '{key}': {_show(value)} is not one of {_listed(_CHOICES[key])}")
        if key in _RULES:
            _check_bound(key, value, _RULES[key])
    for rule in _RELATIONS:
        first, second = _get(cfg, rule.first), _get(cfg, rule.second)
        if not rule.holds(first, second):
            raise ConfigError(
                f"config key '{rule.first}' ({first}) must be {rule.phrase} '{rule.second}' ({second}): {rule.why}"
            )
    problem = check_modalities(cfg.datasets.modalities)
    if problem:
        raise ConfigError(f"config key 'datasets.modalities' ({_show(cfg.datasets.modalities)}): {problem}")
    # The model stacks the modalities in one order, so every table names a subset the same way.
    cfg.datasets.modalities = list(canonical_order(cfg.datasets.modalities))
    datasets = cfg.datasets
    if datasets.names == MANIFEST and not datasets.manifest.strip():
        raise ConfigError(f"config key 'datasets.manifest': datasets.names is '{MANIFEST}', so it must name the CSV "
                          f"file that lists the samples, e.g. datasets.manifest=data/mine.csv")
    if datasets.names != MANIFEST and datasets.manifest.strip():
        raise ConfigError(f"config key 'datasets.manifest' ({_show(datasets.manifest)}) is set, but datasets.names is "
                          f"'{datasets.names}', which reads datasets.root_dir; set datasets.names={MANIFEST} to read "
                          f"the manifest, or datasets.manifest='' to read the layout")


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> Config:
    cfg = Config()
    data = _normalise_keys(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    for key, value in data.items():
        _set(cfg, key, value, source)
    validate_config(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


#: The built-in presets: ``<name>.yaml`` here is the config ``--config <name>`` names.
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def resolve_config_path(value: str | None) -> Path | None:
    """A config argument is a YAML path or the name of a built-in preset (``rgbnt201``)."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        return path
    preset = PRESET_DIR / f"{value}.yaml"
    if preset.is_file():
        return preset
    names = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
    raise ConfigError(f"config '{value}' is neither a file nor a built-in preset ({names})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (or the defaults when ``path`` is None) and apply dotted overrides."""
    if path is None:
        cfg = Config()
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' {'is a directory' if path.is_dir() else 'does not exist'}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file '{path}' is not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: see apply_overrides
            raise ConfigError(f"config file '{path}' is not valid YAML: {_yaml_problem(exc)}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}': expected a mapping at the top level")
        cfg = config_from_dict(data, source=str(path))
    return apply_overrides(cfg, overrides)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
