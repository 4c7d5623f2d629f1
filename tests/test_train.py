"""Training loop: run directory, exact resume (after an epoch and mid-epoch), NaN stop, seeds."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from editor_reid.config import ConfigError, load_config
from editor_reid.engine.checkpoint import STATE_FORMAT, WEIGHTS_FORMAT, load_checkpoint
from editor_reid.engine.logging_utils import MetricsLogger
from editor_reid.engine.sweep import train_seeds
from editor_reid.engine.train import train
from editor_reid.losses import NonFiniteLossError

from _tiny import assert_same_run, train_cfg

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["solver.max_steps_per_epoch=3", "solver.checkpoint_period=1"]


class Stop(Exception):
    """Simulates a kill."""


def tiny_cfg(train_data, out, *extra):
    return train_cfg(train_data, out, *TINY, *extra)


@pytest.fixture(scope="module")
def reference(train_data, tmp_path_factory):
    """An uninterrupted 2-epoch run, the baseline of every resume test."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    summary = train(tiny_cfg(train_data, out, "solver.max_epochs=2", "solver.eval_period=1"), quiet=True)
    return out, summary


def test_run_directory_contents(reference):
    out, summary = reference
    for name in ("config.yaml", "env.json", "metrics.jsonl", "train.log"):
        assert (out / name).is_file(), name
    for name in ("last.pt", "best.pt", "epoch_1.pt", "epoch_2.pt"):
        assert (out / "checkpoints" / name).is_file(), name
    env = json.loads((out / "env.json").read_text())
    assert {"python", "torch", "timm", "device", "git_commit"} <= env.keys()
    assert load_config(out / "config.yaml").solver.max_epochs == 2

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds.count("train") == 6 and kinds.count("epoch") == 2 and kinds.count("eval") == 2
    step = next(r for r in records if r["kind"] == "train")
    assert {"epoch", "step", "lr", "total", "id_fused", "tri_fused", "bcc", "ocfr"} <= step.keys()

    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert last["format"] == STATE_FORMAT
    assert {"model", "criterion", "optimizer", "scheduler", "scaler", "sampler", "rng", "progress", "config"} <= last.keys()
    assert any(k.endswith("_centers") for k in last["criterion"])  # OCFR centres travel with the state
    best = load_checkpoint(out / "checkpoints" / "best.pt")
    assert best["format"] == WEIGHTS_FORMAT and best["epoch"] == summary["best"]["epoch"]
    assert best["metrics"]["mAP"] == pytest.approx(summary["best"]["metrics"]["mAP"])

    assert summary["final"]["epoch"] == 2
    assert summary["best"]["metrics"]["mAP"] >= summary["final"]["metrics"]["mAP"] or summary["best"]["epoch"] == 2
    for value in summary["final"]["metrics"].values():
        assert 0.0 <= value <= 1.0


def test_existing_run_is_not_overwritten(reference, train_data):
    out, _ = reference
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny_cfg(train_data, out, "solver.max_epochs=2"), quiet=True)


def test_resume_after_epoch_is_exact(reference, train_data, tmp_path, caplog):
    ref_dir, ref = reference
    out = tmp_path / "interrupted"

    def kill(epoch):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_cfg(train_data, out, "solver.max_epochs=2", "solver.eval_period=1"), on_epoch_end=kill, quiet=True)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["progress"]["epoch"] == 1
    # The command line may change the schedule-independent keys; the model comes from the run's config.
    other = tiny_cfg(train_data, tmp_path / "elsewhere", "solver.max_epochs=2", "model.depth=3", "solver.log_period=2")
    with caplog.at_level(logging.WARNING, logger="editor_reid"):
        summary = train(other, resume=str(out), quiet=True)
    assert "model.depth" in caplog.text
    assert_same_run(ref_dir, out)
    assert summary["final"]["metrics"] == ref["final"]["metrics"]
    assert load_config(out / "config.yaml").solver.log_period == 2
    # The step records of the killed run were not duplicated.
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("epoch") == 2


def test_resume_after_mid_epoch_kill_is_exact(reference, train_data, tmp_path):
    """Killed in epoch 2 with no step checkpoint: epoch 2 is replayed from the epoch-1 state."""
    ref_dir, _ = reference
    out = tmp_path / "killed"

    def kill(epoch, step):
        if (epoch, step) == (2, 2):
            raise Stop

    with pytest.raises(Stop):
        train(tiny_cfg(train_data, out, "solver.max_epochs=2", "solver.eval_period=1"), on_step=kill, quiet=True)
    train(tiny_cfg(train_data, out, "solver.max_epochs=2"), resume=str(out), quiet=True)
    assert_same_run(ref_dir, out)


def test_resume_from_step_checkpoint_is_exact(reference, train_data, tmp_path):
    """With step checkpoints the resumed run continues after the saved step."""
    ref_dir, _ = reference
    out = tmp_path / "stepwise"
    cfg = tiny_cfg(train_data, out, "solver.max_epochs=2", "solver.eval_period=1")
    cfg.solver.checkpoint_steps = 1

    def kill(epoch, step):
        if (epoch, step) == (2, 2):
            raise Stop

    with pytest.raises(Stop):
        train(cfg, on_step=kill, quiet=True)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (1, 2)
    train(tiny_cfg(train_data, out, "solver.max_epochs=2"), resume=str(out), quiet=True)
    assert_same_run(ref_dir, out)


def test_nonfinite_loss_stops_with_term_epoch_and_step(train_data, tmp_path, monkeypatch):
    import editor_reid.losses as losses

    real_bcc = losses.bcc_loss
    calls = {"n": 0}

    def flaky_bcc(tokens, mask):
        calls["n"] += 1
        value = real_bcc(tokens, mask)
        return value * float("nan") if calls["n"] == 5 else value  # epoch 2, step 2

    monkeypatch.setattr(losses, "bcc_loss", flaky_bcc)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_cfg(train_data, out, "solver.max_epochs=3", "solver.eval_period=0"), quiet=True)
    err = info.value
    assert "bcc" in err.terms and (err.epoch, err.step) == (2, 2)
    assert "'bcc'" in str(err) and "epoch 2" in str(err) and "step 2" in str(err)
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert state["progress"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_train_seeds_reports_mean_and_std(train_data, tmp_path, capsys):
    cfg = tiny_cfg(train_data, tmp_path / "sweep", "solver.max_epochs=1", "solver.max_steps_per_epoch=1",
                   "solver.checkpoint_period=0")
    result = train_seeds(cfg, [1, 2])
    assert (tmp_path / "sweep" / "seed_1" / "checkpoints" / "last.pt").is_file()
    assert (tmp_path / "sweep" / "seed_2" / "checkpoints" / "last.pt").is_file()
    maps = [result["runs"][s]["final"]["metrics"]["mAP"] for s in ("1", "2")]
    agg = result["final"]["mAP"]
    assert agg["mean"] == pytest.approx(sum(maps) / 2)
    assert agg["std"] == pytest.approx(abs(maps[0] - maps[1]) / 2 ** 0.5)
    assert result["best"] is not None
    printed = capsys.readouterr().out
    assert "±" in printed and "final" in printed and "best" in printed
    saved = json.loads((tmp_path / "sweep" / "seeds_summary.json").read_text())
    assert saved["final"]["mAP"]["mean"] == pytest.approx(agg["mean"])
    # A finished sweep is resumed, not retrained or refused.
    again = train_seeds(cfg, [1, 2])
    assert again["final"]["mAP"]["mean"] == pytest.approx(agg["mean"])


def test_tensorboard_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(RuntimeError, match="solver.tensorboard"):
        MetricsLogger(tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb")


def test_metrics_logger_truncates_to_offset(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLogger(path)
    log.log("train", epoch=1, step=1, loss=1.0)
    offset = log.offset()
    log.log("train", epoch=1, step=2, loss=float("nan"))
    log.close()
    assert len(path.read_text().splitlines()) == 2
    assert json.loads(path.read_text().splitlines()[1])["loss"] == "nan"
    MetricsLogger(path, truncate_to=offset).close()
    assert len(path.read_text().splitlines()) == 1
