from pathlib import Path

import pytest

from editor_reid.cli import main, resolve_config_path
from editor_reid.config import Config, ConfigError, config_from_dict, dump_config, load_config

PRESETS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["rgbnt201", "rgbnt100", "msvr310", "market1501mm", "demo"])
def test_presets_load(name):
    cfg = load_config(PRESETS / f"{name}.yaml")
    assert isinstance(cfg, Config)
    assert cfg.datasets.names in ("rgbnt201", "rgbnt100", "msvr310", "market1501mm")


def test_official_values_in_presets():
    r201 = load_config(PRESETS / "rgbnt201.yaml")
    assert r201.input.size_train == [256, 128] and r201.model.al == 1
    assert r201.solver.ims_per_batch == 128 and r201.dataloader.num_instance == 16
    assert r201.model.head_keep == 2 and r201.model.frequency_keep == 10
    assert r201.model.sie_coe == 3.0 and r201.solver.base_lr == 0.001 and r201.solver.bias_lr_factor == 2.0
    assert r201.solver.max_epochs == 70 and r201.solver.warmup_iters == 10 and r201.solver.seed == 1111
    assert r201.input.aug_mode == "independent"
    r100 = load_config(PRESETS / "rgbnt100.yaml")
    assert r100.input.size_train == [128, 256] and r100.model.al == 0
    msvr = load_config(PRESETS / "msvr310.yaml")
    assert msvr.model.al == 0 and msvr.solver.max_epochs == 1000 and msvr.solver.warmup_iters == 100
    mm = load_config(PRESETS / "market1501mm.yaml")
    assert mm.model.al == 1 and mm.input.size_train == [256, 128]


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
