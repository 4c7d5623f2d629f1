"""Lower precision (issue 19): ``amp: auto``, the warning for bf16 on a CPU that emulates it, and
``test --amp``."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from _cli import exit_code, one_line
from _tiny import train_cfg
from editor_reid.config import dump_config
from editor_reid.engine import acceleration
from editor_reid.engine.acceleration import cpu_bf16_native, resolve_amp
from editor_reid.engine.solver import autocast_context, make_grad_scaler


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(acceleration, "_warned_slow_bf16", False)


def test_cpu_bf16_native_names_the_capability():
    native, what = cpu_bf16_native()
    assert isinstance(native, bool)
    assert torch.backends.cpu.get_cpu_capability() in what
    assert ("AMX-BF16" in what or "AVX512-BF16" in what) == native


@pytest.mark.parametrize("native, want", [(True, "bf16"), (False, "none")])
def test_auto_uses_bf16_only_where_the_cpu_has_it(monkeypatch, fresh_warning, native, want):
    monkeypatch.setattr(acceleration, "cpu_bf16_native", lambda: (native, "test CPU"))
    assert resolve_amp("auto", "cpu") == want
    assert resolve_amp("none", "cpu") == "none" and resolve_amp("bf16", "cpu") == "bf16"
    context = autocast_context("cpu", "auto")
    assert isinstance(context, torch.autocast) == native
    assert not make_grad_scaler("cpu", "auto").is_enabled()


def test_explicit_bf16_on_an_emulating_cpu_warns_once(monkeypatch, fresh_warning, caplog):
    monkeypatch.setattr(acceleration, "cpu_bf16_native", lambda: (False, "no AVX512-BF16 or AMX-BF16; torch "
                                                                         "capability AVX2"))
    with caplog.at_level(logging.WARNING, logger="editor_reid.engine.acceleration"):
        for _ in range(3):
            autocast_context("cpu", "bf16")
    warnings = [r for r in caplog.records if "emulated" in r.getMessage()]
    assert len(warnings) == 1 and "capability AVX2" in warnings[0].getMessage()


def test_no_warning_where_bf16_is_native(monkeypatch, fresh_warning, caplog):
    monkeypatch.setattr(acceleration, "cpu_bf16_native", lambda: (True, "AMX-BF16"))
    with caplog.at_level(logging.WARNING, logger="editor_reid.engine.acceleration"):
        autocast_context("cpu", "bf16")
    assert not [r for r in caplog.records if "emulated" in r.getMessage()]


@pytest.fixture(scope="module")
def trained(train_data, tmp_path_factory):
    from editor_reid.engine.train import train

    out = tmp_path_factory.mktemp("amp") / "run"
    cfg = train_cfg(train_data, out, "solver.max_epochs=1")
    train(cfg, quiet=True)
    return cfg, out / "checkpoints" / "last.pt"


def test_test_amp_bf16_extracts_close_features(trained):
    from editor_reid.engine.evaluate import run_test

    cfg, weights = trained
    captured = {}
    for amp in ("none", "bf16"):
        run_test(cfg, weights, quiet=True, device="cpu", amp=amp,
                 then=lambda run, amp=amp: captured.__setitem__(amp, run.features.get("query", ("RGB", "NI", "TI"))))
    fp32, bf16 = captured["none"], captured["bf16"]
    assert fp32.feats.dtype == torch.float32 and bf16.feats.dtype == torch.float32  # cast back
    assert not torch.equal(fp32.feats, bf16.feats)  # bf16 really ran
    cosine = torch.nn.functional.cosine_similarity(fp32.feats, bf16.feats, dim=1)
    assert cosine.min() > 0.99
    # 8 patches per image and near-initial weights: rounding flips near-ties of the rollout here;
    # the ViT-B agreement is measured by benchmarks/bench_bf16.py.
    agreement = (fp32.token_masks == bf16.token_masks).mean()
    assert agreement >= 0.75
    assert np.array_equal(fp32.pids, bf16.pids)


def test_cli_test_amp(trained, tmp_path, capsys):
    cfg, weights = trained
    config = tmp_path / "c.yaml"
    config.write_text(dump_config(cfg))
    assert exit_code(["test", "--config", str(config), "--weights", str(weights), "--amp", "fp16"]) == 2
    assert "'fp16' needs a CUDA device" in one_line(capsys.readouterr().err)
    assert exit_code(["test", "--config", str(config), "--weights", str(weights), "--amp", "auto"]) == 0
    assert "mAP" in capsys.readouterr().out
