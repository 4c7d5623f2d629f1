"""Interruptions and faults lose nothing: signals, full disks, failed renames, damaged checkpoints.

Each fault is injected into a real (tiny) training run; the run is then resumed and must end
with exactly the weights of an uninterrupted run.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from editor_reid.config import dump_config, load_config
from editor_reid.engine import checkpoint as ckpt
from editor_reid.engine.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint
from editor_reid.engine.train import train

from _tiny import assert_same_run, train_cfg

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["solver.max_steps_per_epoch=4", "solver.checkpoint_period=0", "solver.max_epochs=2",
        "solver.eval_period=1"]


def tiny_cfg(train_data, out, *extra):
    return train_cfg(train_data, out, *TINY, *extra)


@pytest.fixture(scope="module")
def references(train_data, tmp_path_factory):
    """Uninterrupted runs by DataLoader worker count (workers draw their own augmentation)."""
    runs = {}

    def reference(workers: int = 0) -> Path:
        if workers not in runs:
            runs[workers] = tmp_path_factory.mktemp("runs") / f"reference_{workers}"
            train(tiny_cfg(train_data, runs[workers], f"dataloader.num_workers={workers}"), quiet=True)
        return runs[workers]

    return reference


@pytest.fixture(scope="module")
def reference(references):
    return references(0)


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------ signals


def _train_process(config: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return subprocess.Popen([sys.executable, "-m", "editor_reid", "train", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, like a terminal's or a job's


def _wait_for_first_step(out: Path, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"training ended before the signal: {process.communicate()[1][-2000:]}")
        if metrics.is_file() and any(json.loads(line)["kind"] == "train" for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    process.kill()
    pytest.fail("no training step within the timeout")


@pytest.mark.parametrize("signum, workers", [(signal.SIGTERM, 0), (signal.SIGINT, 1)])
def test_signal_mid_run_writes_a_checkpoint_and_resume_is_exact(references, train_data, tmp_path, signum, workers):
    out = tmp_path / "signalled"
    config = tmp_path / "run.yaml"
    config.write_text(dump_config(tiny_cfg(train_data, out, f"dataloader.num_workers={workers}")))
    process = _train_process(config, out)
    _wait_for_first_step(out, process)
    os.killpg(process.pid, signum)  # the whole group, workers included, as Ctrl-C or a scheduler does
    _, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, err[-3000:]
    last_line = err.strip().splitlines()[-1]
    assert last_line.startswith(f"editor-reid: training stopped by {signal.Signals(signum).name}")
    assert f"--resume {out}" in last_line and "Traceback" not in err
    state = load_checkpoint(out / "checkpoints" / "last.pt")
    assert (state["progress"]["epoch"], state["progress"]["step"]) != (2, 0), "the signal came too late to test"
    assert leftovers(out) == []
    train(tiny_cfg(train_data, out, f"dataloader.num_workers={workers}"), resume=str(out), quiet=True)
    assert_same_run(references(workers), out)


# ------------------------------------------------------------------------- failed checkpoint writes


def _fail_second_last_pt_write(monkeypatch, target: str, error: OSError) -> None:
    """Make the second write of ``last.pt`` fail in ``torch.save`` or in ``os.replace``."""
    calls = {"n": 0}
    if target == "save":
        real = torch.save

        def failing(obj, f, *args, **kwargs):
            if obj.get("format") == ckpt.STATE_FORMAT:  # a last.pt write
                calls["n"] += 1
                if calls["n"] == 2:
                    raise error
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", failing)
    else:
        real = os.replace

        def failing(src, dst, *args, **kwargs):
            if Path(dst).name == "last.pt":
                calls["n"] += 1
                if calls["n"] == 2:
                    raise error
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(ckpt.os, "replace", failing)


@pytest.mark.parametrize("target, error", [
    ("save", OSError(errno.ENOSPC, "No space left on device")),
    ("replace", OSError(errno.EIO, "Input/output error")),
])
def test_failed_checkpoint_write_keeps_the_previous_one(reference, train_data, tmp_path, monkeypatch, target, error):
    out = tmp_path / "full_disk"
    _fail_second_last_pt_write(monkeypatch, target, error)
    with pytest.raises(CheckpointWriteError) as info:
        train(tiny_cfg(train_data, out), quiet=True)
    monkeypatch.undo()
    message = str(info.value)
    assert "last.pt" in message and error.strerror in message and "unchanged" in message
    assert info.value.errno == error.errno
    assert load_checkpoint(out / "checkpoints" / "last.pt")["progress"]["epoch"] == 1  # the first write survives
    assert leftovers(out) == []
    train(tiny_cfg(train_data, out), resume=str(out), quiet=True)
    assert_same_run(reference, out)


def test_damaged_last_pt_falls_back_to_the_state_before_it(reference, train_data, tmp_path, caplog):
    out = tmp_path / "damaged"

    class Stop(Exception):
        pass

    def stop_after_epoch_1(epoch):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(tiny_cfg(train_data, out, "solver.checkpoint_steps=1"), on_epoch_end=stop_after_epoch_1, quiet=True)
    last, previous = out / "checkpoints" / "last.pt", out / "checkpoints" / "last.prev.pt"
    assert load_checkpoint(previous)["progress"]["step"] == 3  # the step checkpoint before the epoch's end
    last.write_bytes(last.read_bytes()[:1000])  # a truncated copy, a failing disk
    train(tiny_cfg(train_data, out), resume=str(out), quiet=True)
    assert "last.pt" in caplog.text and "last.prev.pt" in caplog.text
    assert_same_run(reference, out)


def test_damaged_last_pt_without_a_previous_one_is_a_clear_error(train_data, tmp_path):
    out = tmp_path / "damaged_alone"
    train(tiny_cfg(train_data, out, "solver.max_epochs=1"), quiet=True)
    (out / "checkpoints" / "last.prev.pt").unlink(missing_ok=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last\.pt' is not a checkpoint: it is an empty file"):
        train(tiny_cfg(train_data, out, "solver.max_epochs=2"), resume=str(out), quiet=True)


# ------------------------------------------------------------------------------ run directories


def test_a_run_that_fails_before_its_first_step_leaves_no_directory(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(FileNotFoundError):
        train(tiny_cfg(tmp_path / "no_data", out), quiet=True)
    assert not out.exists()


def test_an_existing_directory_is_kept_when_the_run_fails(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(FileNotFoundError):
        train(tiny_cfg(tmp_path / "no_data", out), quiet=True)
    assert (out / "notes.txt").read_text() == "the user's"


def test_resume_auto_starts_then_continues(reference, train_data, tmp_path):
    out = tmp_path / "requeued"
    train(tiny_cfg(train_data, out, "solver.max_epochs=1"), resume="auto", quiet=True)
    assert load_checkpoint(out / "checkpoints" / "last.pt")["progress"]["epoch"] == 1
    train(tiny_cfg(train_data, out, "solver.max_epochs=2"), resume="auto", quiet=True)  # the requeued job
    assert load_checkpoint(out / "checkpoints" / "last.pt")["progress"]["epoch"] == 2


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_checkpoints_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        path = ckpt.save_checkpoint(tmp_path / "w.pt", {"w": torch.zeros(1)})
        other = tmp_path / "config.yaml"
        other.write_text("x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode == other.stat().st_mode & 0o777


@pytest.mark.parametrize("content, kind", [
    (b"", "an empty file"),
    (b"model:\n  name: editor\n", "a text file"),
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n\x00", "a PNG image"),
])
def test_files_that_are_no_checkpoint_are_named_as_such(tmp_path, content, kind):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"weights.pth' is not a checkpoint: it is {kind}"):
        load_checkpoint(path)


# ------------------------------------------------------------------------------ short and random runs


def test_one_epoch_trains_at_a_real_learning_rate(train_data, tmp_path):
    out = tmp_path / "one_epoch"
    cfg = tiny_cfg(train_data, out, "solver.max_epochs=1", "solver.warmup_iters=10")
    train(cfg, quiet=True)
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "train"]
    floor = cfg.solver.base_lr * cfg.solver.eta_min_factor
    assert lrs and all(lr > 100 * floor for lr in lrs)


def test_random_initialisation_is_warned_about_and_recorded(train_data, tmp_path, caplog):
    out = tmp_path / "random_init"
    train(tiny_cfg(train_data, out, "model.pretrain_choice=imagenet", "solver.max_epochs=1"), quiet=True)
    assert "RANDOM" in caplog.text and "model.pretrain_path" in caplog.text
    env = json.loads((out / "env.json").read_text())
    assert env["initialisation"].startswith("random") and "pretrain_path is empty" in env["initialisation"]
    assert (out / "config.yaml").read_text().startswith("# initialisation: random")
    assert load_config(out / "config.yaml").model.pretrain_choice == "imagenet"


def test_a_signal_during_a_seed_sweep_says_how_to_continue_it(train_data, tmp_path):
    from editor_reid.engine.sweep import train_seeds
    from editor_reid.errors import TrainingInterrupted

    sent = []

    def sigterm_once(epoch, step):
        if not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)  # caught by the Trainer: the run stops after its next step

    cfg = tiny_cfg(train_data, tmp_path / "sweep", "solver.max_epochs=1")
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="run the same train --seeds command again") as info:
        train_seeds(cfg, [1, 2], on_step=sigterm_once)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before  # the Trainer's handler is gone again
    result = train_seeds(cfg, [1, 2])
    assert result["final"] is not None and set(result["runs"]) == {"1", "2"}
