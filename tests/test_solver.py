"""Optimiser groups, the per-epoch warmup + cosine schedule (vs timm) and AMP helpers (spec §5)."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from timm.scheduler.cosine_lr import CosineLRScheduler

from editor_reid.config import load_config
from editor_reid.engine.solver import WarmupCosineLR, autocast_context, build_optimizer, make_grad_scaler
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
    # weight decay on everything else, norms and tokens included (§10.16)
    assert ids["decay"] == {id(model.cls_token), id(model.pos_embed), id(model.norm.weight), id(model.head.weight)}
    assert groups["decay"]["lr"] == pytest.approx(1e-3)
    assert groups["bias"]["lr"] == pytest.approx(2e-3)
    WarmupCosineLR(opt, cfg)  # like timm, construction applies the epoch-0 warmup LR to every group
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


def _timm_lrs(cfg, model, epochs):
    opt = build_optimizer(cfg, model)
    s = cfg.solver
    sched = CosineLRScheduler(
        opt,
        t_initial=s.max_epochs,
        lr_min=s.base_lr * s.eta_min_factor,
        warmup_t=s.warmup_iters,
        warmup_lr_init=s.base_lr * s.warmup_factor,
        cycle_limit=1,
        t_in_epochs=True,
    )
    out = {0: [g["lr"] for g in opt.param_groups]}
    for epoch in epochs:
        sched.step(epoch)
        out[epoch] = [g["lr"] for g in opt.param_groups]
    return out


@pytest.mark.parametrize("preset", ["rgbnt201", "msvr310"])
def test_schedule_matches_timm_every_epoch(preset):
    cfg = load_config(CONFIGS / f"{preset}.yaml")
    epochs = range(1, cfg.solver.max_epochs + 3)  # a couple past the end too
    reference = _timm_lrs(cfg, Tiny(), epochs)
    opt = build_optimizer(cfg, Tiny())
    sched = WarmupCosineLR(opt, cfg)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(reference[0], rel=1e-12)
    for epoch in epochs:
        sched.step(epoch)
        assert [g["lr"] for g in opt.param_groups] == pytest.approx(reference[epoch], rel=1e-12), epoch
        assert sched.lr_at(epoch) == pytest.approx(reference[epoch], rel=1e-12)


def test_rgbnt201_schedule_values():
    cfg = load_config(CONFIGS / "rgbnt201.yaml")
    opt = build_optimizer(cfg, Tiny())
    sched = WarmupCosineLR(opt, cfg)
    names = [g["name"] for g in opt.param_groups]
    decay, bias = names.index("decay"), names.index("bias")
    lr1 = sched.lr_at(1)
    assert lr1[decay] == pytest.approx(1.09e-4, rel=1e-12)  # 1e-5 + 1 * (1e-3 - 1e-5) / 10
    assert lr1[bias] == pytest.approx(1e-5 + (2e-3 - 1e-5) / 10, rel=1e-12)  # bias warms up to 2e-3
    assert sched.lr_at(9)[decay] == pytest.approx(1e-5 + 9 * (1e-3 - 1e-5) / 10)
    t, T, lr_min = 10, 70, 1e-6
    cosine = 0.5 * (1 + math.cos(math.pi * t / T))
    assert sched.lr_at(10)[decay] == pytest.approx(lr_min + (1e-3 - lr_min) * cosine, rel=1e-12)
    assert sched.lr_at(10)[bias] == pytest.approx(lr_min + (2e-3 - lr_min) * cosine, rel=1e-12)
    assert sched.lr_at(70) == pytest.approx([1e-6, 1e-6], rel=1e-12)
    assert sched.lr_at(69)[decay] > 1e-6
    sched.step(1)
    assert opt.param_groups[decay]["lr"] == pytest.approx(1.09e-4, rel=1e-12)
    assert sched.get_last_lr()[bias] == pytest.approx(2.09e-4, rel=1e-12)
    with pytest.raises(ValueError, match="epoch"):
        sched.lr_at(-1)


def test_msvr310_warmup_is_100_epochs():
    cfg = load_config(CONFIGS / "msvr310.yaml")
    sched = WarmupCosineLR(build_optimizer(cfg, Tiny()), cfg)
    assert sched.warmup_t == 100 and sched.t_initial == 1000
    assert sched.lr_at(1)[0] == pytest.approx(1e-5 + (1e-3 - 1e-5) / 100, rel=1e-12)
    assert sched.lr_at(99)[0] == pytest.approx(1e-5 + 99 * (1e-3 - 1e-5) / 100, rel=1e-12)
    assert sched.lr_at(100)[0] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * 0.1)), rel=1e-12)
    assert sched.lr_at(1000)[0] == pytest.approx(1e-6)


def test_no_warmup_starts_at_base():
    cfg = load_config(None, ["solver.warmup_iters=0", "solver.max_epochs=4"])
    sched = WarmupCosineLR(build_optimizer(cfg, Tiny()), cfg)
    assert sched.lr_at(0)[0] == pytest.approx(1e-3)
    assert sched.lr_at(2)[0] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))


def test_scheduler_state_dict_round_trip_through_weights_only_file(tmp_path):
    from editor_reid.engine.checkpoint import load_checkpoint, save_checkpoint

    cfg = load_config(CONFIGS / "rgbnt201.yaml")
    opt = build_optimizer(cfg, Tiny())
    sched = WarmupCosineLR(opt, cfg)
    sched.step(23)
    save_checkpoint(tmp_path / "s.pth", {"scheduler": sched.state_dict(), "optimizer": opt.state_dict()})
    state = load_checkpoint(tmp_path / "s.pth")
    opt2 = build_optimizer(load_config(CONFIGS / "rgbnt201.yaml", ["solver.base_lr=0.5"]), Tiny())
    sched2 = WarmupCosineLR(opt2, load_config(CONFIGS / "rgbnt201.yaml", ["solver.base_lr=0.5"]))
    sched2.load_state_dict(state["scheduler"])
    assert sched2.last_epoch == 23
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr(), rel=1e-12)
    sched2.step(24)
    sched.step(24)
    assert sched2.get_last_lr() == pytest.approx(sched.get_last_lr(), rel=1e-12)
    with pytest.raises(KeyError, match="missing"):
        sched2.load_state_dict({"last_epoch": 3})


def test_scheduler_rejects_bad_config():
    cfg = load_config(None, ["solver.max_epochs=0"])
    with pytest.raises(ValueError, match="solver.max_epochs"):
        WarmupCosineLR(build_optimizer(cfg, Tiny()), cfg)


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
