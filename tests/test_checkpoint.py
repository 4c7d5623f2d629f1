"""Checkpoint files: atomic save, weights_only load, RNG round trip, the training-state schema."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from editor_reid.config import load_config
from editor_reid.data.sampler import RandomIdentitySampler
from editor_reid.engine import checkpoint as ckpt
from editor_reid.engine.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from editor_reid.engine.rng import capture_rng_state, restore_rng_state
from editor_reid.engine.solver import build_optimizer, build_scheduler, make_grad_scaler


def _state(value: float) -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {
        "epoch": 3,
        "model": {"w": torch.full((2, 2), value)},
        "optimizer": opt.state_dict(),
        "meta": {"name": "editor", "best": None, "history": [0.5, 0.7], "shape": (2, 2)},
    }


def test_round_trip_and_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "last.pth"
    state = _state(1.0)
    assert save_checkpoint(path, state) == path
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["meta"] == state["meta"]
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert os.listdir(path.parent) == ["last.pth"]
    save_checkpoint(path, _state(2.0))  # overwrite in place
    assert load_checkpoint(path)["model"]["w"][0, 0].item() == 2.0
    assert os.listdir(path.parent) == ["last.pth"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_failure_mid_write_keeps_previous_file(tmp_path, monkeypatch, error):
    path = tmp_path / "last.pth"
    save_checkpoint(path, _state(1.0))
    before = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(50)  # leave partial bytes behind, then fail
        raise error

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(type(error)):
        save_checkpoint(path, _state(2.0))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert load_checkpoint(path)["model"]["w"][0, 0].item() == 1.0
    assert os.listdir(tmp_path) == ["last.pth"]


def test_save_refuses_objects_weights_only_cannot_load(tmp_path):
    path = tmp_path / "bad.pth"
    with pytest.raises(CheckpointError, match=r"state\['extra'\]\['arr'\].*numpy"):
        save_checkpoint(path, {"extra": {"arr": np.zeros(3)}})
    with pytest.raises(CheckpointError, match=r"state\['items'\]\[1\]"):
        save_checkpoint(path, {"items": [1, object()]})
    assert not path.exists() and os.listdir(tmp_path) == []


_EXECUTED: list[str] = []


def _record(tag):
    _EXECUTED.append(tag)
    return tag


class Payload:
    def __reduce__(self):
        return (_record, ("pickled code ran",))


def test_load_refuses_arbitrary_python_objects(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="evil.pth") as info:
        load_checkpoint(path)
    assert "weights_only" in str(info.value)
    assert _EXECUTED == []


def test_load_missing_truncated_and_non_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    path = tmp_path / "cut.pth"
    save_checkpoint(path, _state(1.0))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match="cut.pth"):
        load_checkpoint(path)
    listed = tmp_path / "list.pth"
    torch.save([1, 2], listed)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(listed)


def _draw():
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + [float(np.random.randn())],
        torch.rand(3).tolist() + torch.randn(2).tolist(),
    )


def test_rng_round_trip_through_file(tmp_path):
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's generator
    np.random.randn()  # an odd number of draws leaves NumPy's cached Gaussian set
    state = capture_rng_state()
    first = _draw()
    save_checkpoint(tmp_path / "rng.pth", {"rng": state})
    _draw()  # move every generator on
    restore_rng_state(load_checkpoint(tmp_path / "rng.pth")["rng"])
    assert _draw() == first


def test_restore_rng_state_names_missing_parts():
    with pytest.raises(KeyError, match="numpy"):
        restore_rng_state({"python": capture_rng_state()["python"], "torch": torch.get_rng_state()})


def _parts(seed: int = 0):
    torch.manual_seed(seed)
    cfg = load_config(None, ["solver.max_epochs=5", "solver.warmup_iters=2"])
    model, criterion = torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)
    optimizer = build_optimizer(cfg, model)
    return {"model": model, "criterion": criterion, "optimizer": optimizer,
            "scheduler": build_scheduler(optimizer, cfg), "scaler": make_grad_scaler("cpu", "none"),
            "sampler": RandomIdentitySampler([0, 0, 1, 1], 4, 2, seed=7)}


def test_training_state_round_trip_restores_every_part(tmp_path):
    parts = _parts(0)
    parts["model"](torch.randn(4, 3)).sum().backward()
    parts["optimizer"].step()
    parts["scheduler"].step(3)
    parts["sampler"].set_epoch(3)
    state = ckpt.capture_training_state(**parts, progress={"epoch": 3}, config={"a": 1}, metrics_offset=42,
                                        num_classes=2, num_cameras=1)
    save_checkpoint(tmp_path / "last.pt", state)
    loaded = load_checkpoint(tmp_path / "last.pt")
    ckpt.check_training_state(loaded, tmp_path / "last.pt")
    fresh = _parts(1)
    kept = ckpt.restore_training_state(loaded, **fresh)
    assert kept["progress"] == {"epoch": 3} and kept["metrics_offset"] == 42 and kept["rng"] is not None
    assert torch.equal(fresh["model"].weight, parts["model"].weight)
    assert fresh["optimizer"].state_dict()["state"].keys() == parts["optimizer"].state_dict()["state"].keys()
    assert [g["lr"] for g in fresh["optimizer"].param_groups] == [g["lr"] for g in parts["optimizer"].param_groups]
    assert fresh["scheduler"].state_dict() == parts["scheduler"].state_dict()
    assert fresh["sampler"].epoch == 3


def test_check_training_state_refuses_other_files(tmp_path):
    with pytest.raises(CheckpointError, match="not an editor-reid training state"):
        ckpt.check_training_state({"format": ckpt.WEIGHTS_FORMAT}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="newer editor-reid"):
        ckpt.check_training_state({"format": ckpt.STATE_FORMAT, "version": ckpt.CHECKPOINT_VERSION + 1}, "x.pt")
    assert ckpt.is_editor_reid_checkpoint({"format": ckpt.WEIGHTS_FORMAT})
    assert not ckpt.is_editor_reid_checkpoint({"model.weight": torch.zeros(1)})


def test_training_state_of_the_earlier_schedule_layout_still_resumes():
    """last.pt files written before the schedule became timm's: the schedule comes from the config."""
    parts = _parts(0)
    state = ckpt.capture_training_state(**parts, progress={"epoch": 1}, config={}, metrics_offset=0,
                                        num_classes=2, num_cameras=1)
    state["scheduler"] = {"t_initial": 5, "warmup_t": 2, "warmup_lr_init": 1e-5, "lr_min": 1e-6,
                          "base_lrs": [1e-3, 2e-3], "last_epoch": 1}
    fresh = _parts(1)
    expected = fresh["scheduler"].state_dict()
    ckpt.restore_training_state(state, **fresh)
    assert fresh["scheduler"].state_dict() == expected
