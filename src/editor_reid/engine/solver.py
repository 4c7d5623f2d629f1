"""Optimiser, per-epoch warmup + cosine LR schedule, and mixed-precision helpers
(docs/official-behaviour.md#training-recipe).

The official recipe: SGD (momentum 0.9) at base LR 1e-3 for every parameter, LR x2 for any
parameter whose name contains "bias", weight decay 1e-4 on everything (norms, cls_token,
pos_embed and sie_embed included, docs/official-behaviour.md#quirk-weight-decay-everywhere), and timm's
``CosineLRScheduler`` stepped once per epoch with a linear warmup measured in epochs.

The CLIP recipes (docs/clip.md) add three switches, all off by default: ``solver.optimizer_name:
Adam`` (torch's Adam, weight decay as an L2 term per group), ``solver.backbone_lr`` (one LR for
every pretrained ViT tensor) and ``solver.lr_noise`` (timm's multiplicative LR noise).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterable

import torch
import torch.nn as nn
from timm.scheduler.cosine_lr import CosineLRScheduler

from editor_reid.config import AMP_CHOICES, ConfigError
from editor_reid.engine.acceleration import resolve_amp

log = logging.getLogger(__name__)

__all__ = [
    "build_optimizer",
    "build_scheduler",
    "autocast_context",
    "make_grad_scaler",
]


# The pretrained ViT inside an EDITOR model (``backbone.vit.*``), also under a DDP/compile wrapper
# prefix. The SIE table and the unused fc live beside it (``backbone.sie_embed``): trained from
# scratch, they keep base_lr, as the CLIP recipes' camera embedding outside their ``base`` module.
_PRETRAINED = re.compile(r"(^|\.)backbone\.vit\.")


def _named_trainable(model: nn.Module, extra_params) -> list[tuple[str, nn.Parameter]]:
    named = list(model.named_parameters())
    if extra_params is not None:
        if isinstance(extra_params, nn.Module):
            named += [(f"extra.{n}", p) for n, p in extra_params.named_parameters()]
        else:
            for i, item in enumerate(extra_params):
                name, param = item if isinstance(item, tuple) else (f"extra.{i}", item)
                named.append((name, param))
    seen: set[int] = set()
    out = []
    for name, param in named:
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        out.append((name, param))
    return out


def build_optimizer(cfg, model: nn.Module, extra_params: Iterable | nn.Module | None = None) -> torch.optim.Optimizer:
    """SGD (or AdamW) over the trainable parameters of ``model`` (and ``extra_params``).

    ``extra_params``: a module or an iterable of parameters / ``(name, parameter)`` pairs that
    are not part of ``model`` (e.g. a loss with learnable weights). Parameters with
    ``requires_grad=False`` (the OCFR centres are buffers anyway) are skipped.

    Parameters are grouped by (lr, weight decay): a "decay" group at ``solver.base_lr`` /
    ``solver.weight_decay`` and a "bias" group (name contains "bias") at
    ``base_lr * solver.bias_lr_factor`` / ``solver.weight_decay_bias``. Each group records its
    ``lr_factor``; the scheduler scales from each group's own starting LR.

    With ``solver.backbone_lr`` > 0 the pretrained ViT's tensors (``backbone.vit.*``, weights
    and biases alike) form their own groups at that LR (names "backbone" / "backbone_bias",
    weight decay as above): the CLIP recipes fine-tune the CLIP tower at 5e-6 while the new
    modules train at base_lr. ``solver.optimizer_name``: SGD (momentum ``solver.momentum``),
    Adam or AdamW, each with its default betas and eps and each group's own weight decay.
    """
    s = cfg.solver
    if s.base_lr <= 0:
        raise ValueError(f"config key 'solver.base_lr' must be > 0, got {s.base_lr}")
    named = _named_trainable(model, extra_params)
    if not named:
        raise ValueError("build_optimizer: the model has no parameters with requires_grad=True")
    if s.backbone_lr < 0:
        raise ValueError(f"config key 'solver.backbone_lr' must be >= 0, got {s.backbone_lr}")
    groups: dict[tuple[bool, float, float], dict[str, Any]] = {}
    for name, param in named:
        is_bias = "bias" in name
        pretrained = s.backbone_lr > 0 and _PRETRAINED.search(name) is not None
        if pretrained:
            lr = s.backbone_lr
            factor = s.backbone_lr / s.base_lr
        else:
            factor = s.bias_lr_factor if is_bias else 1.0
            lr = s.base_lr * factor
        wd = s.weight_decay_bias if is_bias else s.weight_decay
        key = (pretrained, factor, wd)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lr,
                "weight_decay": wd,
                "lr_factor": factor,
                "name": ("backbone_" if pretrained else "") + ("bias" if is_bias else "decay"),
            }
        groups[key]["params"].append(param)
    param_groups = list(groups.values())
    if s.optimizer_name == "SGD":
        return torch.optim.SGD(param_groups, lr=s.base_lr, momentum=s.momentum)
    if s.optimizer_name == "Adam":
        return torch.optim.Adam(param_groups, lr=s.base_lr)
    if s.optimizer_name == "AdamW":
        return torch.optim.AdamW(param_groups, lr=s.base_lr)
    raise ValueError(f"config key 'solver.optimizer_name': {s.optimizer_name!r} is not one of SGD, Adam, AdamW")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> CosineLRScheduler:
    """timm's ``CosineLRScheduler`` exactly as the official EDITOR code builds it.

    For a group with starting LR ``base`` (its ``initial_lr``) and epoch t:

    - t < warmup_t:  warmup_lr_init + t * (base - warmup_lr_init) / warmup_t
    - warmup_t <= t < T:  lr_min + (base - lr_min) * (1 + cos(pi * t / T)) / 2
    - t >= T:  lr_min

    with T = ``solver.max_epochs``, warmup_t = ``solver.warmup_iters`` (epochs),
    warmup_lr_init = ``base_lr * solver.warmup_factor`` and lr_min =
    ``base_lr * solver.eta_min_factor``. warmup_lr_init and lr_min are shared by all groups
    (computed from ``solver.base_lr``), while each group warms up to and decays from its own
    base (the bias group to 2 * base_lr). The cosine uses the absolute epoch (no warmup prefix
    shift), so the last epoch (t = T) runs at lr_min. Construction sets the LR of epoch 0; call
    ``step(epoch)`` at the start of every epoch, epoch = 1..T.

    Short runs (T <= max(warmup_t, 1), e.g. a 1-epoch smoke run) are too short for that shape:
    the warmup is skipped and the cosine runs over T + 1 epochs, so epoch t gets
    lr_min + (base - lr_min) * (1 + cos(pi * t / (T + 1))) / 2 and none runs at the floor. The scheduler keeps no epoch counter: its ``state_dict`` holds the
    schedule only, and the LR of the epoch in progress comes back with the optimiser's state.

    ``solver.lr_noise`` > 0 (the CLIP recipes: 0.67) turns on timm's LR noise for the epochs
    0 <= t < T: every group's LR of epoch t is multiplied by (1 + n_t), n_t a standard normal
    draw from a generator seeded ``solver.lr_noise_seed + t``, redrawn until |n_t| < lr_noise. The
    same seed gives the same LRs in every run; the LR set at construction has no noise.
    """
    s = cfg.solver
    # timm asserts on a bad t_initial or lr_min and takes a negative warmup_t; name the key instead.
    if s.max_epochs <= 0:
        raise ValueError(f"config key 'solver.max_epochs' must be > 0, got {s.max_epochs}")
    if s.warmup_iters < 0:
        raise ValueError(f"config key 'solver.warmup_iters' must be >= 0, got {s.warmup_iters}")
    if s.eta_min_factor < 0:
        raise ValueError(f"config key 'solver.eta_min_factor' must be >= 0, got {s.eta_min_factor}")
    if not 0 <= s.lr_noise < 1:  # at 1 or above, 1 + n could reach 0 or flip the LR's sign
        raise ValueError(f"config key 'solver.lr_noise' must be in [0, 1), got {s.lr_noise}")
    noise = {}
    if s.lr_noise > 0:
        noise = dict(noise_range_t=(0, s.max_epochs), noise_pct=s.lr_noise, noise_std=1.0, noise_seed=s.lr_noise_seed)
    t_initial, warmup_t = s.max_epochs, s.warmup_iters
    if s.max_epochs <= max(s.warmup_iters, 1):
        # Too short for the official shape: its warmup would never end, and its last epoch
        # (epoch T) runs at the floor LR, which for a 1-epoch run is the whole run. Skip the
        # warmup and stretch the cosine by one epoch, so every epoch trains.
        t_initial, warmup_t = s.max_epochs + 1, 0
        log.warning("solver.max_epochs=%d is not longer than the warmup (solver.warmup_iters=%d): the warmup is "
                    "skipped and the cosine runs over %d epochs, so that no epoch runs at the floor LR",
                    s.max_epochs, s.warmup_iters, t_initial)
    return _CheckedCosineLR(
        optimizer,
        t_initial=t_initial,
        lr_min=s.base_lr * s.eta_min_factor,
        warmup_t=warmup_t,
        warmup_lr_init=s.base_lr * s.warmup_factor,
        cycle_limit=1,
        t_in_epochs=True,
        **noise,
    )


class _CheckedCosineLR(CosineLRScheduler):
    """timm's scheduler, refusing what it would otherwise take silently: its
    ``load_state_dict`` merges any dict into the object (a foreign or truncated checkpoint
    entry would leave a half-old schedule), and a negative epoch extrapolates the warmup line
    to a negative LR."""

    def step(self, epoch: int, metric: float | None = None) -> None:
        if epoch < 0:
            raise ValueError(f"LR scheduler: epoch must be >= 0, got {epoch}")
        super().step(epoch, metric)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        missing = set(self.state_dict()) - set(state_dict)
        if missing:
            raise KeyError(f"LR scheduler state is missing keys {sorted(missing)}; it was not written by "
                           "timm's CosineLRScheduler (build_scheduler)")
        groups = len(self.optimizer.param_groups)
        if len(state_dict["base_values"]) != groups:
            raise ValueError(f"LR scheduler state has {len(state_dict['base_values'])} param groups, "
                             f"the optimiser {groups}")
        super().load_state_dict(state_dict)


def _device_kind(device_type: str | torch.device) -> str:
    return torch.device(device_type).type


def _check_amp(amp: str) -> None:
    if amp not in AMP_CHOICES:
        raise ValueError(f"config key 'solver.amp': {amp!r} is not one of {', '.join(AMP_CHOICES)}")


def autocast_context(device_type: str | torch.device, amp: str):
    """The autocast context for ``solver.amp``: "none" (fp32), "fp16" (CUDA only), "bf16", or
    "auto" (:func:`~editor_reid.engine.acceleration.resolve_amp`: bf16 where the device computes
    it natively, else fp32 on CPU and fp16 on an old GPU).

    fp16 on CPU is refused: CPU autocast has no loss scaling and its fp16 kernels are slow;
    use "bf16" there.
    """
    _check_amp(amp)
    kind = _device_kind(device_type)
    amp = resolve_amp(amp, kind)
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16":
        if kind != "cuda":
            raise ConfigError(f"config key 'solver.amp': 'fp16' needs a CUDA device, got '{kind}'; "
                             "use solver.amp=bf16 or solver.amp=none")
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    if kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("config key 'solver.amp': 'bf16' is not supported by this GPU; use solver.amp=fp16")
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)


def make_grad_scaler(device_type: str | torch.device, amp: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 on CUDA (bf16 and fp32 need no loss scaling)."""
    _check_amp(amp)
    kind = _device_kind(device_type)
    amp = resolve_amp(amp, kind) if amp == "auto" else amp
    return torch.amp.GradScaler(kind, enabled=(kind == "cuda" and amp == "fp16"))
