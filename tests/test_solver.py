"""Optimiser groups, the per-epoch warmup + cosine schedule (timm's, against the official formula)
and AMP helpers (docs/official-behaviour.md#training-recipe)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.scheduler.cosine_lr import CosineLRScheduler

from editor_reid.config import load_config
from editor_reid.engine.solver import autocast_context, build_optimizer, build_scheduler, make_grad_scaler
from editor_reid.losses import EditorCriterion

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.register_buffer("running", torch.zeros(4))


def _groups(opt):
    return {g["name"]: g for g in opt.param_groups}


def test_optimizer_groups_bias_lr_and_weight_decay():
    cfg = load_config(CONFIGS / "rgbnt201.yaml")
    model = Tiny()
    opt = build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.SGD)
    groups = _groups(opt)
    assert set(groups) == {"decay", "bias"}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["bias"] == {id(model.norm.bias), id(model.head.bias)}
    # weight decay on everything else, norms and tokens included
    # (docs/official-behaviour.md#quirk-weight-decay-everywhere)
    assert ids["decay"] == {id(model.cls_token), id(model.pos_embed), id(model.norm.weight), id(model.head.weight)}
    assert groups["decay"]["lr"] == pytest.approx(1e-3)
    assert groups["bias"]["lr"] == pytest.approx(2e-3)
    build_scheduler(opt, cfg)  # construction applies the epoch-0 warmup LR to every group
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-5, 1e-5])
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx([1e-3, 2e-3])
    assert groups["bias"]["weight_decay"] == pytest.approx(1e-4)
    assert groups["decay"]["weight_decay"] == pytest.approx(1e-4)
    assert groups["decay"]["momentum"] == pytest.approx(0.9) and groups["decay"]["nesterov"] is False
    assert groups["bias"]["lr_factor"] == 2.0 and groups["decay"]["lr_factor"] == 1.0


def test_optimizer_group_base_lrs_before_scheduler_and_distinct_decay():
    cfg = load_config(None, ["solver.weight_decay_bias=0.0", "solver.base_lr=0.01"])
    opt = build_optimizer(cfg, Tiny())
    groups = _groups(opt)
    assert groups["decay"]["lr"] == pytest.approx(0.01)
    assert groups["bias"]["lr"] == pytest.approx(0.02)
    assert groups["bias"]["weight_decay"] == 0.0


def test_optimizer_excludes_frozen_and_ocfr_centres_includes_extra_params():
    cfg = load_config(None)
    model = Tiny()
    criterion = EditorCriterion(cfg, num_classes=5, dim=4)
    opt = build_optimizer(cfg, model, extra_params=criterion)
    all_ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(model.frozen.weight) not in all_ids and id(model.frozen.bias) not in all_ids
    assert all(id(b) not in all_ids for b in criterion.buffers())
    assert len(all_ids) == 6
    extra = nn.Linear(2, 2)
    opt = build_optimizer(cfg, model, extra_params=extra)
    groups = _groups(opt)
    assert id(extra.bias) in {id(p) for p in groups["bias"]["params"]}
    assert sum(len(g["params"]) for g in opt.param_groups) == 8


def test_adamw_option_and_errors():
    opt = build_optimizer(load_config(None, ["solver.optimizer_name=AdamW"]), Tiny())
    assert isinstance(opt, torch.optim.AdamW)
    assert _groups(opt)["bias"]["lr"] == pytest.approx(2e-3)
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="requires_grad"):
        build_optimizer(load_config(None), frozen)


def _official_lr(cfg, base: float, epoch: int) -> float:
    """The official schedule (timm's CosineLRScheduler with cycle_limit=1, no warmup prefix)."""
    s = cfg.solver
    warmup_lr_init, lr_min = s.base_lr * s.warmup_factor, s.base_lr * s.eta_min_factor
    if epoch < s.warmup_iters:
        return warmup_lr_init + epoch * (base - warmup_lr_init) / s.warmup_iters
    if epoch >= s.max_epochs:
        return lr_min
    return lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * epoch / s.max_epochs))


def _lrs(opt) -> list[float]:
    return [g["lr"] for g in opt.param_groups]


def _lrs_at(sched, epoch: int) -> list[float]:
    """The LR of every group at ``epoch``; timm's scheduler keeps no epoch, so any order works."""
    sched.step(epoch)
    return _lrs(sched.optimizer)


@pytest.mark.parametrize("preset", ["rgbnt201", "msvr310"])
def test_schedule_matches_official_formula_every_epoch(preset):
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    opt = build_optimizer(cfg, Tiny())
    sched = build_scheduler(opt, cfg)
    assert isinstance(sched, CosineLRScheduler)
    bases = [g["initial_lr"] for g in opt.param_groups]
    assert _lrs(opt) == pytest.approx([_official_lr(cfg, b, 0) for b in bases], rel=1e-12)
    for epoch in range(1, cfg.solver.max_epochs + 3):  # a couple past the end too
        sched.step(epoch)
        assert _lrs(opt) == pytest.approx([_official_lr(cfg, b, epoch) for b in bases], rel=1e-12), epoch


def test_rgbnt201_schedule_values():
    cfg = load_config(CONFIGS / "rgbnt201.yaml")
    opt = build_optimizer(cfg, Tiny())
    sched = build_scheduler(opt, cfg)
    names = [g["name"] for g in opt.param_groups]
    decay, bias = names.index("decay"), names.index("bias")
    lr1 = _lrs_at(sched, 1)
    assert lr1[decay] == pytest.approx(1.09e-4, rel=1e-12)  # 1e-5 + 1 * (1e-3 - 1e-5) / 10
    assert lr1[bias] == pytest.approx(1e-5 + (2e-3 - 1e-5) / 10, rel=1e-12)  # bias warms up to 2e-3
    assert _lrs_at(sched, 9)[decay] == pytest.approx(1e-5 + 9 * (1e-3 - 1e-5) / 10)
    t, T, lr_min = 10, 70, 1e-6
    cosine = 0.5 * (1 + math.cos(math.pi * t / T))
    assert _lrs_at(sched, 10)[decay] == pytest.approx(lr_min + (1e-3 - lr_min) * cosine, rel=1e-12)
    assert _lrs_at(sched, 10)[bias] == pytest.approx(lr_min + (2e-3 - lr_min) * cosine, rel=1e-12)
    assert _lrs_at(sched, 70) == pytest.approx([1e-6, 1e-6], rel=1e-12)
    assert _lrs_at(sched, 69)[decay] > 1e-6
    sched.step(1)
    assert opt.param_groups[decay]["lr"] == pytest.approx(1.09e-4, rel=1e-12)
    assert opt.param_groups[bias]["lr"] == pytest.approx(2.09e-4, rel=1e-12)
    with pytest.raises(ValueError, match="epoch"):
        sched.step(-1)


def test_msvr310_warmup_is_100_epochs():
    cfg = load_config(CONFIGS / "msvr310.yaml")
    sched = build_scheduler(build_optimizer(cfg, Tiny()), cfg)
    assert sched.warmup_t == 100 and sched.t_initial == 1000
    assert _lrs_at(sched, 1)[0] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 100, rel=1e-12)
    assert _lrs_at(sched, 99)[0] == pytest.approx(1e-5 + 99 * (1e-3 - 1e-5) / 100, rel=1e-12)
    assert _lrs_at(sched, 100)[0] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 0.1)),
                                                   rel=1e-12)
    assert _lrs_at(sched, 1000)[0] == pytest.approx(1e-6)


def test_no_warmup_starts_at_base():
    cfg = load_config(None, ["solver.warmup_iters=0", "solver.max_epochs=4"])
    opt = build_optimizer(cfg, Tiny())
    sched = build_scheduler(opt, cfg)
    assert _lrs(opt)[0] == pytest.approx(1e-3)  # construction, as epoch 0
    assert _lrs_at(sched, 0)[0] == pytest.approx(1e-3)
    assert _lrs_at(sched, 2)[0] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))


def test_scheduler_state_dict_round_trip_through_weights_only_file(tmp_path):
    from editor_reid.engine.checkpoint import load_checkpoint, save_checkpoint

    cfg = load_config(CONFIGS / "rgbnt201.yaml")
    opt = build_optimizer(cfg, Tiny())
    sched = build_scheduler(opt, cfg)
    sched.step(23)
    save_checkpoint(tmp_path / "s.pth", {"scheduler": sched.state_dict(), "optimizer": opt.state_dict()})
    state = load_checkpoint(tmp_path / "s.pth")
    other = load_config(CONFIGS / "rgbnt201.yaml", ["solver.base_lr=0.5"])
    opt2 = build_optimizer(other, Tiny())
    sched2 = build_scheduler(opt2, other)
    # Resuming restores both: the LR of the epoch in progress lives in the optimiser's groups.
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["scheduler"])
    assert sched2.state_dict() == sched.state_dict()
    assert _lrs(opt2) == pytest.approx(_lrs(opt), rel=1e-12)
    bases = [1e-3, 2e-3]  # the saved schedule, not base_lr=0.5
    assert _lrs_at(sched2, 23) == pytest.approx([_official_lr(cfg, b, 23) for b in bases], rel=1e-12)
    assert _lrs(opt2) == pytest.approx(_lrs(opt), rel=1e-12)
    sched2.step(24)
    sched.step(24)
    assert _lrs(opt2) == pytest.approx(_lrs(opt), rel=1e-12)
    with pytest.raises(KeyError, match="missing"):
        sched2.load_state_dict({"last_epoch": 3})
    one_group = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-3)
    with pytest.raises(ValueError, match="param groups"):
        build_scheduler(one_group, cfg).load_state_dict(state["scheduler"])


@pytest.mark.parametrize("override, key", [
    ("solver.max_epochs=0", "solver.max_epochs"),
    ("solver.warmup_iters=-1", "solver.warmup_iters"),
    ("solver.eta_min_factor=-0.1", "solver.eta_min_factor"),
])
def test_scheduler_rejects_bad_config(override, key):
    # The config refuses these values when loaded; the scheduler checks them again for a Config
    # built in code.
    cfg = load_config(None)
    section, rest = override.split(".", 1)
    name, value = rest.split("=")
    setattr(getattr(cfg, section), name, type(getattr(getattr(cfg, section), name))(value))
    with pytest.raises(ValueError, match=key):
        build_scheduler(build_optimizer(cfg, Tiny()), cfg)


def test_autocast_context_modes():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast_context("cpu", "none"):
        assert (a @ b).dtype == torch.float32
    assert isinstance(autocast_context("cpu", "none"), contextlib.nullcontext)
    with autocast_context(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="solver.amp"):
        autocast_context("cpu", "fp16")
    with pytest.raises(ValueError, match="solver.amp"):
        autocast_context("cpu", "fp32")


def test_grad_scaler_enabled_only_for_cuda_fp16():
    assert not make_grad_scaler("cpu", "none").is_enabled()
    assert not make_grad_scaler("cpu", "bf16").is_enabled()
    assert not make_grad_scaler("cuda", "bf16").is_enabled()
    assert not make_grad_scaler("cuda", "none").is_enabled()
    if torch.cuda.is_available():
        assert make_grad_scaler("cuda:0", "fp16").is_enabled()
    with pytest.raises(ValueError, match="solver.amp"):
        make_grad_scaler("cpu", "half")


@pytest.mark.parametrize("max_epochs, warmup", [(1, 10), (1, 0), (5, 10)])
def test_short_runs_skip_the_warmup_and_never_train_at_the_floor(max_epochs, warmup):
    cfg = load_config(None, [f"solver.max_epochs={max_epochs}", f"solver.warmup_iters={warmup}"])
    opt = build_optimizer(cfg, Tiny())
    sched = build_scheduler(opt, cfg)
    base, lr_min = cfg.solver.base_lr, cfg.solver.base_lr * cfg.solver.eta_min_factor
    for epoch in range(1, max_epochs + 1):
        sched.step(epoch)
        expected = lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * epoch / (max_epochs + 1)))
        decay = next(g for g in opt.param_groups if g["name"] == "decay")
        assert decay["lr"] == pytest.approx(expected, rel=1e-12) and decay["lr"] > 10 * lr_min
