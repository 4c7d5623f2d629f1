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


# ----------------------------------------------------------------------------- CLIP recipe switches (docs/clip.md)


class WithBackbone(nn.Module):
    """The parameter names of an EDITOR model: a pretrained ViT under backbone.vit, the SIE table
    beside it, new modules elsewhere."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.vit = nn.Linear(4, 4)
        self.backbone.sie_embed = nn.Parameter(torch.zeros(2, 1, 4))
        self.head = nn.Linear(4, 3)


def _names(opt, model) -> dict[str, set[str]]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {by_id[id(p)] for p in g["params"]} for g in opt.param_groups}


def test_backbone_lr_groups_the_pretrained_vit_only():
    model = WithBackbone()
    cfg = load_config(None, ["solver.base_lr=3.5e-4", "solver.backbone_lr=5e-6", "solver.weight_decay_bias=0.5"])
    opt = build_optimizer(cfg, model)
    assert _names(opt, model) == {
        "backbone_decay": {"backbone.vit.weight"},
        "backbone_bias": {"backbone.vit.bias"},
        "decay": {"backbone.sie_embed", "head.weight"},
        "bias": {"head.bias"},
    }
    groups = _groups(opt)
    assert groups["backbone_decay"]["lr"] == groups["backbone_bias"]["lr"] == 5e-6  # no bias factor on the tower
    assert groups["backbone_decay"]["lr_factor"] == pytest.approx(5e-6 / 3.5e-4)
    assert groups["backbone_bias"]["weight_decay"] == 0.5 and groups["backbone_decay"]["weight_decay"] == 1e-4
    assert groups["bias"]["lr"] == pytest.approx(7e-4) and groups["decay"]["lr"] == 3.5e-4
    wrapped = nn.Module()
    wrapped.module = model  # a DDP-style prefix still finds the tower
    assert _names(build_optimizer(cfg, wrapped), wrapped)["backbone_decay"] == {"module.backbone.vit.weight"}


def test_default_groups_are_unchanged_by_the_clip_switches():
    model = WithBackbone()
    opt = build_optimizer(load_config(None), model)
    assert _names(opt, model) == {"decay": {"backbone.vit.weight", "backbone.sie_embed", "head.weight"},
                                  "bias": {"backbone.vit.bias", "head.bias"}}
    assert [(g["lr"], g["weight_decay"], g["lr_factor"]) for g in opt.param_groups] == [(1e-3, 1e-4, 1.0),
                                                                                       (2e-3, 1e-4, 2.0)]
    assert isinstance(opt, torch.optim.SGD) and build_scheduler(opt, load_config(None)).noise_range_t is None


def test_adam_uses_coupled_l2_weight_decay():
    # Zero gradient, weight decay only: Adam turns the L2 term into a full-size first step
    # (|update| = lr), AdamW only shrinks the weight by lr * wd.
    for name, expected in (("Adam", 1.0 - 0.01), ("AdamW", 1.0 * (1 - 0.01 * 0.1))):
        param = nn.Parameter(torch.ones(3))
        holder = nn.Module()
        holder.w = param
        cfg = load_config(None, [f"solver.optimizer_name={name}", "solver.base_lr=0.01", "solver.weight_decay=0.1"])
        opt = build_optimizer(cfg, holder)
        assert type(opt) is getattr(torch.optim, name)
        param.grad = torch.zeros(3)
        opt.step()
        assert param.detach() == pytest.approx(torch.full((3,), expected), rel=1e-5), name


def _demo_noise(seed: int, epoch: int, pct: float) -> float:
    """timm's LR noise as the CLIP ReID repositories use it (noise_std 1, normal draws)."""
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    while True:
        n = torch.randn(1, generator=g).item()
        if abs(n) < pct:
            return n


def test_clip_schedule_warmup_from_shared_init_and_lr_noise():
    cfg = load_config(CONFIGS / "rgbnt201_clip.yaml")
    model = WithBackbone()
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(opt, cfg)
    s = cfg.solver
    init, lr_min = s.base_lr * 0.1, s.base_lr * 0.001  # DeMo: warmup_lr_init 0.1*base, lr_min 0.001*base
    # The tower's weights and biases share LR and weight decay here, so they share one group.
    assert _lrs(opt) == pytest.approx([init] * 3, rel=1e-12)  # construction: epoch 0, no noise
    bases = [g["initial_lr"] for g in opt.param_groups]
    assert sorted(bases) == pytest.approx([5e-6, 3.5e-4, 7e-4])
    noisy = 0
    for epoch in range(1, s.max_epochs + 2):
        sched.step(epoch)
        factor = 1 + _demo_noise(42, epoch, 0.67) if epoch < s.max_epochs else 1.0
        noisy += factor != 1.0
        for group, base in zip(opt.param_groups, bases):
            if epoch < s.warmup_iters:  # the tower warms *down* from 3.5e-5 to 5e-6, as in DeMo
                clean = init + epoch * (base - init) / s.warmup_iters
            elif epoch < s.max_epochs:
                clean = lr_min + 0.5 * (base - lr_min) * (1 + math.cos(math.pi * epoch / s.max_epochs))
            else:
                clean = lr_min
            assert group["lr"] == pytest.approx(clean * factor, rel=1e-12), (epoch, group["name"])
    assert noisy == s.max_epochs - 1
    other = load_config(CONFIGS / "rgbnt201_clip.yaml", ["solver.lr_noise_seed=7"])
    opt2 = build_optimizer(other, WithBackbone())
    assert _lrs_at(build_scheduler(opt2, other), 20) != pytest.approx(_lrs_at(sched, 20))


def test_lr_noise_is_checked_for_configs_built_in_code():
    cfg = load_config(None)
    cfg.solver.lr_noise = 1.0
    with pytest.raises(ValueError, match="solver.lr_noise"):
        build_scheduler(build_optimizer(cfg, Tiny()), cfg)
    cfg = load_config(None)
    cfg.solver.backbone_lr = -1.0
    with pytest.raises(ValueError, match="solver.backbone_lr"):
        build_optimizer(cfg, Tiny())
