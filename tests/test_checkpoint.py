"""Checkpoint files: atomic save, weights_only load, RNG round trip, non-finite detection."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from editor_reid.engine import checkpoint as ckpt
from editor_reid.engine.checkpoint import (
    CheckpointError,
    NonFiniteLossError,
    capture_rng_state,
    load_checkpoint,
    nonfinite_check,
    restore_rng_state,
    save_checkpoint,
)


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


def test_nonfinite_check_names_term_epoch_step():
    nonfinite_check({"id_fused": torch.tensor(1.0), "bcc": 0.5}, epoch=1, step=2)
    terms = {"id_fused": torch.tensor(1.0), "bcc": torch.tensor(float("nan")), "ocfr": torch.tensor(float("inf"))}
    with pytest.raises(NonFiniteLossError) as info:
        nonfinite_check(terms, epoch=4, step=17)
    message = str(info.value)
    assert "'bcc'" in message and "'ocfr'" in message and "'id_fused'" not in message
    assert "epoch 4" in message and "step 17" in message
    assert set(info.value.terms) == {"bcc", "ocfr"} and info.value.epoch == 4 and info.value.step == 17
    with pytest.raises(NonFiniteLossError, match="'total'"):
        nonfinite_check({"total": float("-inf")}, epoch=0, step=0)
    nonfinite_check({}, epoch=0, step=0)
    assert ckpt.NonFiniteLossError is NonFiniteLossError
