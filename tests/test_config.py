"""Configuration: presets, typed overrides, ranges of every numeric key, unknown-key hints, and a
property test that any input gives a Config or a ConfigError."""

import dataclasses
import math
import re
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from editor_reid import config as config_module
from editor_reid.cli import main, resolve_config_path
from editor_reid.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    validate_config,
)

PRESETS = Path(__file__).resolve().parents[1] / "configs"


OFFICIAL_PRESETS = ("rgbnt201", "rgbnt100", "msvr310", "market1501mm")

# Switches where this package deviates from the official code (or adds to it); their defaults
# reproduce the official behaviour and the official presets must not flip them.
DEVIATION_SWITCHES = (
    "input.aug_mode",
    "model.frequency_mode",
    "model.sync_bn",
    "datasets.skip_bad_images",
    "test.re_ranking",
    "test.distance",
)


def _get(cfg: Config, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@pytest.mark.parametrize("name", [*OFFICIAL_PRESETS, "demo"])
def test_packaged_preset_is_the_repository_config(name):
    # `--config rgbnt201` reads the copy inside the package; configs/ is what users read and edit.
    cfg = load_config(resolve_config_path(name))
    assert cfg == load_config(PRESETS / f"{name}.yaml")
    assert cfg.datasets.names == (name if name != "demo" else "rgbnt201")


@pytest.mark.parametrize("name", OFFICIAL_PRESETS)
def test_official_presets_keep_every_deviation_off(name):
    cfg, defaults = load_config(PRESETS / f"{name}.yaml"), Config()
    assert {key: _get(cfg, key) for key in DEVIATION_SWITCHES} == {key: _get(defaults, key) for key in DEVIATION_SWITCHES}


def test_overrides_are_typed():
    cfg = load_config(PRESETS / "rgbnt201.yaml", overrides=["solver.base_lr=0.002", "input.size_train=[128,64]",
                                                          "input.size_test=[128,64]", "model.sfts=false"])
    assert cfg.solver.base_lr == 0.002
    assert cfg.input.size_train == [128, 64]
    assert cfg.model.sfts is False
    # An integer is accepted where a float is expected, and stored as float.
    assert isinstance(load_config(None, ["solver.base_lr=1"]).solver.base_lr, float)


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"solver\.base_lr"):
        load_config(None, ["solver.base_lrr=0.1"])
    with pytest.raises(ConfigError, match=r"model\.head_keep"):
        load_config(None, ["model.headkeep=3"])


def test_wrong_type_names_key():
    with pytest.raises(ConfigError, match=r"solver\.max_epochs.*integer"):
        load_config(None, ["solver.max_epochs=ten"])
    with pytest.raises(ConfigError, match=r"model\.sfts.*true/false"):
        load_config(None, ["model.sfts=3"])
    with pytest.raises(ConfigError, match=r"solver\.amp.*fp16"):
        load_config(None, ["solver.amp=fp8"])


def test_yacs_style_upper_case_file(tmp_path):
    path = tmp_path / "official.yml"
    path.write_text("MODEL:\n  HEAD_KEEP: 3\nSOLVER:\n  MAX_EPOCHS: 5\nOUTPUT_DIR: /tmp/x\n")
    cfg = load_config(path)
    assert cfg.model.head_keep == 3 and cfg.solver.max_epochs == 5 and cfg.output_dir == "/tmp/x"


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  sfts: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(None, ["solver.base_lr"])


def test_consistency_checks():
    with pytest.raises(ConfigError, match="multiple"):
        load_config(None, ["solver.ims_per_batch=30", "dataloader.num_instance=4"])
    with pytest.raises(ConfigError, match="datasets.modalities"):
        load_config(None, ["datasets.modalities=[RGB,xx]"])


def test_dump_round_trip():
    cfg = load_config(PRESETS / "rgbnt100.yaml")
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_preset_name_resolution_and_cli_error(capsys):
    assert resolve_config_path("rgbnt201").name == "rgbnt201.yaml"
    with pytest.raises(ConfigError, match="neither a file nor a built-in preset"):
        resolve_config_path("nope")
    rc = main(["info", "--config", "rgbnt201", "solver.base_lrr=1"])
    assert rc == 2
    assert "did you mean 'solver.base_lr'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- ranges and finiteness

def _leaves(cls=Config, prefix=""):
    """(dotted key, annotation) of every leaf key, from the dataclasses themselves."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", hints[f.name]


KEYS = [key for key, _ in _leaves()]
NUMERIC = {int, float, list[int], list[float]}
FLOAT_KEYS = [key for key, annotation in _leaves() if annotation in (float, list[float])]


def test_every_numeric_key_has_a_range_rule():
    # A new numeric key must say what it accepts; the reference table shows it.
    numeric = {key for key, annotation in _leaves() if annotation in NUMERIC}
    assert numeric == set(config_module._RULES)


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "nan", "1e400"])
def test_every_float_key_refuses_non_finite_values(key, text):
    value = text if key not in ("input.pixel_mean", "input.pixel_std") else f"[{text}, 0.5, 0.5]"
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}(\[0\])?': expected a finite number"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("solver.ims_per_batch=0", "'solver.ims_per_batch': expected >= 1, got 0"),
        ("test.ims_per_batch=0", "'test.ims_per_batch': expected >= 1, got 0"),
        ("solver.max_epochs=0", "'solver.max_epochs': expected >= 1, got 0"),
        ("dataloader.num_workers=-1", "'dataloader.num_workers': expected >= 0, got -1"),
        ("dataloader.num_instance=0", "'dataloader.num_instance': expected >= 1, got 0"),
        ("solver.base_lr=0", "'solver.base_lr': expected > 0, got 0.0"),
        ("solver.base_lr=-0.1", "'solver.base_lr': expected > 0, got -0.1"),
        ("input.prob=1.5", "'input.prob': expected in [0, 1], got 1.5"),
        ("input.re_prob=-0.1", "'input.re_prob': expected in [0, 1], got -0.1"),
        ("model.drop_path=2", "'model.drop_path': expected in [0, 1], got 2.0"),
        ("solver.momentum=1", "'solver.momentum': expected in [0, 1), got 1.0"),
        ("solver.weight_decay=-1e-4", "'solver.weight_decay': expected >= 0, got -0.0001"),
        ("solver.weight_decay_bias=-1", "'solver.weight_decay_bias': expected >= 0"),
        ("solver.eta_min_factor=-0.1", "'solver.eta_min_factor': expected >= 0, got -0.1"),
        ("solver.warmup_factor=0", "'solver.warmup_factor': expected > 0, got 0.0"),
        ("solver.warmup_iters=-1", "'solver.warmup_iters': expected >= 0, got -1"),
        ("solver.eval_period=-1", "'solver.eval_period': expected >= 0, got -1"),
        ("solver.checkpoint_period=-1", "'solver.checkpoint_period': expected >= 0, got -1"),
        ("solver.log_period=-1", "'solver.log_period': expected >= 0, got -1"),
        ("solver.seed=-1", "'solver.seed': expected in [0, 4294967295], got -1"),
        ("test.max_rank=0", "'test.max_rank': expected >= 1, got 0"),
        ("test.rerank_k1=0", "'test.rerank_k1': expected >= 1, got 0"),
        ("test.rerank_k2=0", "'test.rerank_k2': expected >= 1, got 0"),
        ("test.rerank_lambda=1.2", "'test.rerank_lambda': expected in [0, 1], got 1.2"),
        ("model.ocfr_momentum=-0.5", "'model.ocfr_momentum': expected in [0, 1], got -0.5"),
        ("model.head_keep=-1", "'model.head_keep': expected >= 0, got -1"),
        ("model.frequency_keep=-2", "'model.frequency_keep': expected >= 0, got -2"),
        ("model.embed_dim=-64", "'model.embed_dim': expected >= 0, got -64"),
        ("model.al=2", "'model.al': expected 0 or 1, got 2"),
        ("model.stride_size=[12,12]", "'model.stride_size': expected 2 values, each 16, got [12, 12]"),
        ("input.pixel_std=[0.5,0,0.5]", "'input.pixel_std': expected 3 values, each > 0, got [0.5, 0.0, 0.5]"),
        ("input.pixel_mean=[0.5]", "'input.pixel_mean': expected 3 finite numbers, got [0.5]"),
        ("model.id_loss_weight=-1", "'model.id_loss_weight': expected >= 0, got -1.0"),
    ],
)
def test_out_of_range_values_name_key_value_and_range(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_input_size_names_the_nearest_valid_sizes():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["input.size_train=[100,50]", "input.size_test=[100,50]"])
    assert str(info.value) == (
        "config key 'input.size_train': expected 2 values, each a positive multiple of 16, got [100, 50]; "
        "nearest valid: [96, 48] or [112, 64]"
    )
    with pytest.raises(ConfigError, match=r"nearest valid: \[16, 16\]$"):
        load_config(None, ["input.size_train=[8,0]", "input.size_test=[8,0]"])


def test_num_instance_zero_is_a_range_error_not_a_division():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["solver.ims_per_batch=32", "dataloader.num_instance=0"])
    assert "dataloader.num_instance': expected >= 1, got 0" in str(info.value)
    assert "multiple" not in str(info.value)


def test_relations_between_keys():
    with pytest.raises(ConfigError, match=r"'model.embed_dim' \(100\) must be divisible by 'model.num_heads' \(12\)"):
        load_config(None, ["model.embed_dim=100", "model.num_heads=12"])
    with pytest.raises(ConfigError, match=r"'model.embed_dim' \(96\) must be divisible by 'model.hma_heads' \(5\)"):
        load_config(None, ["model.embed_dim=96", "model.hma_heads=5"])
    with pytest.raises(ConfigError, match=r"'input.size_train' \(\[128, 64\]\) must be equal to 'input.size_test'"):
        load_config(None, ["input.size_train=[128,64]"])
    # 0 = the architecture's default: not checked against the other key here.
    assert load_config(None, ["model.embed_dim=100"]).model.embed_dim == 100


def test_boundary_values_are_accepted():
    cfg = load_config(None, [
        "solver.momentum=0", "input.prob=1", "input.re_prob=0", "solver.eta_min_factor=0", "solver.checkpoint_period=0",
        "solver.eval_period=0", "solver.log_period=0", "model.head_keep=0", "test.rerank_lambda=1", "model.ocfr_momentum=1",
        "solver.seed=0", f"solver.seed={config_module.MAX_SEED}", "model.sie_coe=-3", "dataloader.num_workers=0",
    ])
    assert cfg.solver.seed == config_module.MAX_SEED and cfg.model.sie_coe == -3.0


def test_range_checks_run_for_files_and_dicts_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("SOLVER:\n  BASE_LR: .nan\n")
    with pytest.raises(ConfigError, match=r"'solver.base_lr': expected a finite number"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'test.max_rank': expected >= 1"):
        config_from_dict({"test": {"max_rank": 0}})


def test_exponent_without_a_dot_is_a_number():
    # YAML 1.1 reads 1e-3 as a string; a float key takes it as the number it spells.
    assert load_config(None, ["solver.base_lr=1e-3"]).solver.base_lr == 0.001


def test_validate_config_catches_values_set_by_hand():
    cfg = Config()
    cfg.solver.seed = -1
    with pytest.raises(ConfigError, match="solver.seed"):
        validate_config(cfg)
    cfg = Config()
    cfg.solver.base_lr = math.nan
    with pytest.raises(ConfigError, match="solver.base_lr"):
        validate_config(cfg)


def test_range_text_shown_in_the_reference():
    rules = config_module._RULES
    assert rules["solver.momentum"].text() == "in [0, 1)"
    assert rules["input.size_train"].text() == "2 values, each a positive multiple of 16"
    assert rules["model.al"].text() == "0 or 1" and rules["solver.base_lr"].text() == "> 0"


# ----------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "override, hint",
    [
        ("model.base_lr=0.1", "did you mean 'solver.base_lr'?"),
        ("base_lr=0.1", "did you mean 'solver.base_lr'?"),
        ("solvers.base_lr=0.1", "did you mean 'solver.base_lr'?"),
        ("input.num_workers=2", "did you mean 'dataloader.num_workers'?"),
        ("model.ims_per_batch=8", "did you mean 'solver.ims_per_batch' or 'test.ims_per_batch'?"),
        ("model={base_lr: 0.1}", "did you mean 'solver.base_lr'?"),
    ],
)
def test_key_in_the_wrong_section_suggests_the_right_section(override, hint):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value).endswith(hint)


def test_wrong_section_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  max_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'model.max_epochs'; did you mean 'solver.max_epochs'\?"):
        load_config(path)


def test_yaml_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  sfts: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert "\n" not in str(info.value) and "line 3" in str(info.value)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\x00\xff")
    with pytest.raises(ConfigError, match="not a UTF-8 text file"):
        load_config(binary)
    for text in ("x=[1", "output_dir=2024-02-30", "solver.max_epochs=" + "9" * 5000):
        with pytest.raises(ConfigError, match="not valid YAML") as info:
            load_config(None, [text])
        assert "\n" not in str(info.value) and len(str(info.value)) < 400


# ----------------------------------------------------------------------------- any input: Config or ConfigError

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from([0, 1, 2, 16, 128, 0.5, -1, "rgbnt201", "RGB", "AdamW", "[256, 128]"]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS + ["model", "x"]) | st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_KEY_TEXT = st.one_of(
    st.sampled_from(KEYS),
    st.sampled_from(["model", "solver", "input", "test", "", ".", "model.", "solver.base_lr.x", "MODEL.HEAD_KEEP"]),
    st.text(max_size=30),
    st.builds(lambda k: k.rsplit(".", 1)[-1], st.sampled_from(KEYS)),  # a key without its section
)


def _dump(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def _typed_value(key: str, annotation):
    """Values of the key's own type, in and around its range, so that many configs load."""
    choices = config_module._CHOICES.get(key)
    by_type = {
        bool: st.booleans(),
        int: st.integers(-2, 300),
        float: st.floats(-0.5, 2.0) | st.sampled_from([0.0, 1.0, 1e-4]),
        str: st.sampled_from(choices) if choices else st.text(max_size=12),
        list[int]: st.lists(st.sampled_from([16, 32, 128, 256, 100, 0]), min_size=1, max_size=3),
        list[float]: st.lists(st.floats(-1, 1), min_size=2, max_size=4),
        list[str]: st.lists(st.sampled_from(["RGB", "NI", "TI", "XX"]), max_size=3, unique=True),
    }
    return by_type[annotation].map(lambda v: f"{key}={_dump(v)}")


_TYPED = st.one_of(*[_typed_value(key, annotation) for key, annotation in _leaves()])
_OVERRIDE = st.one_of(
    st.text(max_size=60),  # anything at all, "=" or not, unicode included
    st.builds(lambda k, v: f"{k}={_dump(v)}", _KEY_TEXT, _VALUES),
    st.builds(lambda k, v: f"{k}={v}", _KEY_TEXT, st.text(max_size=40)),
    _TYPED,
)


def _round_trip(cfg: Config) -> None:
    validate_config(cfg)
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    validate_config(again)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_OVERRIDE, max_size=4))
def test_any_override_yields_a_config_or_a_config_error(overrides):
    try:
        cfg = apply_overrides(Config(), overrides)
    except ConfigError as exc:
        assert str(exc)
        return
    _round_trip(cfg)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_TYPED, max_size=6))
def test_well_typed_overrides_load_or_name_the_key(overrides):
    try:
        cfg = apply_overrides(Config(), overrides)
    except ConfigError as exc:
        assert "config key" in str(exc) and "\n" not in str(exc)
        return
    _round_trip(cfg)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS + ["model", "solver", "input"]) | st.text(max_size=10), _VALUES, max_size=5))
def test_any_mapping_yields_a_config_or_a_config_error(data):
    # Dotted keys at the top level are how a flat mapping names a key; nested ones come from _VALUES.
    try:
        cfg = config_from_dict(data)
    except ConfigError:
        return
    _round_trip(cfg)


@pytest.mark.parametrize("name", [*OFFICIAL_PRESETS, "demo"])
def test_every_preset_passes_validation_after_a_round_trip(name):
    _round_trip(load_config(resolve_config_path(name)))
