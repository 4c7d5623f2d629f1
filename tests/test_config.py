from pathlib import Path

import pytest

from editor_reid.cli import main, resolve_config_path
from editor_reid.config import Config, ConfigError, config_from_dict, dump_config, load_config

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
        load_config(None, ["datasets.modalities=[RGB,XX]"])


def test_dump_round_trip():
    cfg = load_config(PRESETS / "rgbnt100.yaml")
    import yaml

    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_preset_name_resolution_and_cli_error(capsys):
    assert resolve_config_path("rgbnt201").name == "rgbnt201.yaml"
    with pytest.raises(ConfigError, match="neither a file nor a built-in preset"):
        resolve_config_path("nope")
    rc = main(["info", "--config", "rgbnt201", "solver.base_lrr=1"])
    assert rc == 2
    assert "did you mean 'solver.base_lr'" in capsys.readouterr().err
