"""The training loop: EDITOR losses, per-epoch warmup-cosine LR, evaluation, checkpoints, resume.

Run directory (``cfg.output_dir``, or the directory given to ``resume``)::

    config.yaml          resolved configuration (the one a resumed run reads back)
    env.json             python / torch / timm versions, device, git commit (env.resume-<epoch>.json per resume)
    train.log            the log messages
    metrics.jsonl        one JSON record per logged step, epoch and evaluation
    tensorboard/         scalars, when solver.tensorboard is true
    checkpoints/last.pt  full training state after the last finished epoch (or step block)
    checkpoints/best.pt  weights + metrics of the best-mAP evaluation
    checkpoints/epoch_{n}.pt  weights every solver.checkpoint_period epochs

Exact resume: every epoch starts by re-seeding the RNGs from (seed, epoch, rank) and the
sampler orders its indices from (seed, epoch), so an epoch's data order, augmentation and
dropout depend only on where it starts, never on what ran before in the process. A run
resumed from ``last.pt`` therefore ends with the same weights as an uninterrupted one on a
deterministic device (CPU, or CUDA with solver.deterministic). A checkpoint written in the
middle of an epoch (solver.checkpoint_steps) also stores the RNG state after its step; the
resumed run replays the loader up to that step without computing, then restores the RNGs.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from editor_reid.config import Config, ConfigError, config_from_dict, config_to_dict, dump_config
from editor_reid.engine import distributed as du
from editor_reid.engine.checkpoint import NonFiniteLossError, nonfinite_check
from editor_reid.engine.inference import METRIC_KEYS, batch_images, build_eval_loaders, evaluate_model
from editor_reid.engine.logging_utils import MetricsLogger, attach_file_log, ensure_console_log, write_environment

__all__ = ["train", "train_seeds", "NonFiniteLossError", "RESUMABLE_KEYS", "STATE_FORMAT", "WEIGHTS_FORMAT"]

log = logging.getLogger(__name__)

STATE_FORMAT = "editor-reid/train-state"
WEIGHTS_FORMAT = "editor-reid/weights"
CHECKPOINT_VERSION = 1

# Config keys a resumed run may take from the command line; everything else comes from the
# run's saved config.yaml (changing the model, data or optimiser mid-run would not be a resume).
RESUMABLE_KEYS = (
    "solver.max_epochs",
    "solver.eval_period",
    "solver.checkpoint_period",
    "solver.checkpoint_steps",
    "solver.log_period",
    "solver.tensorboard",
    "dataloader.num_workers",
    "datasets.root_dir",
    "test.",
)

StepHook = Callable[[int, int], None]


# ----------------------------------------------------------------------------------- seeding


def _epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _configure_determinism(cfg: Config, device: torch.device) -> None:
    """Deterministic kernels for solver.deterministic; train() restores the previous setting."""
    if not cfg.solver.deterministic:
        return
    if device.type == "cuda":
        # cuBLAS needs a fixed workspace for deterministic GEMMs; set before the first CUDA GEMM.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True)


# ------------------------------------------------------------------------------ run directory


def _is_resumable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_config(run_dir: Path, cfg: Config) -> Config:
    """The config of the run in ``run_dir`` with the command line's resumable keys applied.

    Keys outside :data:`RESUMABLE_KEYS` that differ between ``cfg`` and the saved config are
    ignored with a warning naming them; ``output_dir`` is always ``run_dir``.
    """
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (is '{run_dir}' a run directory?)")
    saved = config_from_dict(yaml.safe_load(path.read_text()), source=str(path))
    saved_flat, new_flat = _flat(config_to_dict(saved)), _flat(config_to_dict(cfg))
    taken, ignored = [], []
    for key, value in new_flat.items():
        if key == "output_dir" or saved_flat.get(key) == value:
            continue
        if _is_resumable(key):
            section, name = key.split(".", 1)
            setattr(getattr(saved, section), name, value)
            taken.append(f"{key}={value!r}")
        else:
            ignored.append(f"{key} (run: {saved_flat.get(key)!r}, command line: {value!r})")
    if taken:
        log.info("resume: taking from the command line: %s", ", ".join(taken))
    if ignored:
        log.warning("resume: the run's saved config.yaml is used for these keys; the command line's values are "
                    "ignored: %s", "; ".join(ignored))
    saved.output_dir = str(run_dir)
    return saved


# -------------------------------------------------------------------------------- checkpoints


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _weights_payload(cfg: Config, model: nn.Module, criterion: nn.Module, *, epoch: int, metrics: dict | None,
                     num_classes: int, num_cameras: int) -> dict:
    return {
        "format": WEIGHTS_FORMAT,
        "version": CHECKPOINT_VERSION,
        "epoch": epoch,
        "metrics": metrics,
        "model": _unwrap(model).state_dict(),
        "criterion": criterion.state_dict(),
        "config": config_to_dict(cfg),
        "num_classes": num_classes,
        "num_cameras": num_cameras,
    }


# ------------------------------------------------------------------------------------- train


@dataclasses.dataclass
class _Progress:
    """Counters that survive a resume (stored in last.pt)."""

    epoch: int = 0  # last completed epoch
    step: int = 0  # steps completed inside epoch + 1 (mid-epoch checkpoints only)
    global_step: int = 0
    history: list = dataclasses.field(default_factory=list)  # evaluation records
    best: dict | None = None  # {"epoch": e, "metrics": {...}}
    epoch_sums: dict = dataclasses.field(default_factory=dict)  # running loss sums of a partial epoch
    epoch_time: float = 0.0  # seconds spent in a partial epoch before a mid-epoch checkpoint


def train(cfg: Config, resume: str | Path | None = None, *, on_step: StepHook | None = None,
          on_epoch_end: Callable[[int], None] | None = None, evaluate_untrained: bool = False,
          device: str | None = None, quiet: bool = False) -> dict:
    """Train EDITOR as configured and return a summary (final and best evaluation, run dir).

    ``resume`` is a run directory: training continues from its ``checkpoints/last.pt`` with
    its saved ``config.yaml`` (see :func:`resume_config` for what the command line may change).
    ``on_step(epoch, step)`` runs after every optimiser step and ``on_epoch_end(epoch)`` after
    each epoch's checkpoint is written (tests use them to interrupt a run).
    ``evaluate_untrained`` also evaluates the freshly initialised model (recorded as epoch 0).
    ``quiet`` suppresses the printed summary (the log and metrics files are still written).
    """
    from editor_reid.data.layouts import load_dataset
    from editor_reid.data.loaders import build_train_loader
    from editor_reid.engine import checkpoint as ckpt
    from editor_reid.engine.solver import WarmupCosineLR, build_optimizer, make_grad_scaler
    from editor_reid.losses import EditorCriterion
    from editor_reid.engine.acceleration import maybe_compile
    from editor_reid.model import build_model

    ensure_console_log()
    ctx = du.init_distributed(device)
    pkg_log = logging.getLogger("editor_reid")
    pkg_level = pkg_log.level
    if not ctx.is_main:  # one voice: the other ranks only warn
        pkg_log.setLevel(logging.WARNING)
    resume_dir = Path(resume) if resume is not None else None
    if resume_dir is not None:
        cfg = resume_config(resume_dir, cfg)
        run_dir = resume_dir
        state_path = run_dir / "checkpoints" / "last.pt"
        if not state_path.is_file():
            shared = "" if ctx.is_main else (f" (seen from rank {ctx.rank}: with several machines the run directory "
                                             "must be on a filesystem they all see)")
            raise FileNotFoundError(f"cannot resume: {state_path} does not exist{shared}")
    else:
        run_dir = Path(cfg.output_dir)
        if (run_dir / "checkpoints" / "last.pt").exists():
            raise ConfigError(
                f"output_dir '{run_dir}' already holds a run (checkpoints/last.pt); continue it with "
                f"`--resume {run_dir}` or choose another directory with output_dir=..."
            )
    file_handler = None
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        file_handler = attach_file_log(run_dir / "train.log")
    try:
        _check_world_size(cfg, ctx)
        _configure_determinism(cfg, ctx.device)
        seed_everything(cfg.solver.seed)

        splits = load_dataset(cfg.datasets.names, cfg.datasets.root_dir)
        num_classes, num_cameras = splits.num_train_pids, splits.num_cameras
        train_loader, sampler = build_train_loader(cfg, splits, rank=ctx.rank, world_size=ctx.world_size)
        train_loader = _epoch_seeded(train_loader)
        eval_loaders = build_eval_loaders(cfg, splits) if ctx.is_main else None

        model = build_model(cfg, num_classes, num_cameras, pretrained=resume_dir is None).to(ctx.device)
        criterion = EditorCriterion(cfg, num_classes, model.embed_dim, **du.criterion_hooks(ctx)).to(ctx.device)
        model = du.wrap_model(ctx, maybe_compile(model, cfg), sync_bn=cfg.model.sync_bn)
        optimizer = build_optimizer(cfg, _unwrap(model))
        scheduler = WarmupCosineLR(optimizer, cfg)
        scaler = make_grad_scaler(ctx.device, cfg.solver.amp)

        progress = _Progress()
        metrics_offset = None
        if resume_dir is not None:
            state = ckpt.load_checkpoint(run_dir / "checkpoints" / "last.pt", map_location="cpu")
            _check_state(state, run_dir / "checkpoints" / "last.pt")
            _unwrap(model).load_state_dict(state["model"])
            criterion.load_state_dict(state["criterion"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            sampler.load_state_dict(state["sampler"])
            progress = _Progress(**state["progress"])
            metrics_offset = state.get("metrics_offset")
            resume_rng = state.get("rng")
            log.info("resuming %s from epoch %d%s", run_dir, progress.epoch,
                     f", step {progress.step}" if progress.step else "")
        else:
            resume_rng = None

        metrics_log = MetricsLogger(
            run_dir / "metrics.jsonl", enabled=ctx.is_main, truncate_to=metrics_offset,
            tensorboard_dir=(run_dir / "tensorboard") if getattr(cfg.solver, "tensorboard", False) else None,
        )
        du.barrier(ctx)  # every rank has read config.yaml and last.pt before rank 0 rewrites the run files
        if ctx.is_main:
            (run_dir / "config.yaml").write_text(dump_config(cfg))
            # A resumed run keeps the original env.json and records its own environment beside it.
            env_name = f"env.resume-{progress.epoch}.json" if resume_dir is not None else "env.json"
            write_environment(run_dir / env_name, ctx.device, world_size=ctx.world_size)
            log.info("run directory: %s", run_dir.resolve())
            log.info("data: %s, %d train IDs, %d cameras, %d train / %d query / %d gallery samples",
                     splits.name, num_classes, num_cameras, len(splits.train), len(splits.query), len(splits.gallery))

        loop = _Loop(cfg=cfg, ctx=ctx, run_dir=run_dir, model=model, criterion=criterion, optimizer=optimizer,
                     scheduler=scheduler, scaler=scaler, sampler=sampler, loader=train_loader, splits=splits,
                     eval_loaders=eval_loaders, metrics_log=metrics_log, progress=progress, ckpt=ckpt,
                     num_classes=num_classes, num_cameras=num_cameras, on_step=on_step, on_epoch_end=on_epoch_end)
        try:
            if evaluate_untrained and progress.epoch == 0 and progress.step == 0:
                loop.evaluate(0)
            loop.run(resume_rng)
        finally:
            metrics_log.close()
        summary = loop.summary()
        if ctx.is_main and not quiet:
            print(format_summary(summary))
        return summary
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        pkg_log.setLevel(pkg_level)
        if file_handler is not None:
            pkg_log.removeHandler(file_handler)
            file_handler.close()
        du.shutdown_distributed(ctx)


def _check_world_size(cfg: Config, ctx: du.DistContext) -> None:
    """solver.ims_per_batch is the global batch: each rank must get an equal share of it."""
    if not ctx.distributed:
        return
    batch, k, world = cfg.solver.ims_per_batch, cfg.dataloader.num_instance, ctx.world_size
    if batch % world:
        raise ConfigError(f"solver.ims_per_batch={batch} is the global batch and must be divisible by the number "
                          f"of processes ({world})")
    if (batch // world) % k:
        scopes = [key for key in ("triplet_scope", "ocfr_scope") if getattr(cfg.model, key) == "local"]
        log.warning("each of the %d ranks gets %d images of every P×K batch, which splits identities of "
                    "dataloader.num_instance=%d images across ranks%s", world, batch // world, k,
                    f"; with {' and '.join(f'model.{key}=local' for key in scopes)} a rank sees only part of "
                    "those identities" if scopes else "")


def _epoch_seeded(loader: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
    """The same loader without persistent workers and with its own generator.

    Workers are then started afresh every epoch, with their base seed drawn from the
    generator the loop re-seeds from (seed, epoch), so augmentation of epoch e does not depend
    on the epochs before it; persistent workers would carry their RNG streams across epochs
    and make a resumed run diverge.
    """
    if loader.num_workers == 0 and isinstance(loader.generator, torch.Generator):
        return loader
    return torch.utils.data.DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last,
        num_workers=loader.num_workers, collate_fn=loader.collate_fn, pin_memory=loader.pin_memory,
        worker_init_fn=loader.worker_init_fn, persistent_workers=False, generator=torch.Generator(),
        timeout=loader.timeout, prefetch_factor=loader.prefetch_factor if loader.num_workers > 0 else None,
    )


def _check_state(state: Any, path: Path) -> None:
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an editor-reid training state (expected format '{STATE_FORMAT}')")
    if state.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path} was written by a newer editor-reid (checkpoint version {state['version']})")


class _Loop:
    def __init__(self, *, cfg: Config, ctx: du.DistContext, run_dir: Path, model, criterion, optimizer, scheduler,
                 scaler, sampler, loader, splits, eval_loaders, metrics_log: MetricsLogger, progress: _Progress, ckpt,
                 num_classes: int, num_cameras: int, on_step, on_epoch_end):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.model, self.criterion, self.optimizer, self.scheduler, self.scaler = (
            model, criterion, optimizer, scheduler, scaler)
        self.sampler, self.loader, self.splits, self.eval_loaders = sampler, loader, splits, eval_loaders
        self.metrics_log, self.progress, self.ckpt = metrics_log, progress, ckpt
        self.num_classes, self.num_cameras = num_classes, num_cameras
        self.on_step, self.on_epoch_end = on_step, on_epoch_end
        self.modalities = tuple(cfg.datasets.modalities)
        self.epoch_times: list[float] = []

    # -- checkpoints -------------------------------------------------------------------------

    def _state(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "version": CHECKPOINT_VERSION,
            "model": _unwrap(self.model).state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": self.ckpt.capture_rng_state(),
            "progress": dataclasses.asdict(self.progress),
            "config": config_to_dict(self.cfg),
            "metrics_offset": self.metrics_log.offset(),
            "num_classes": self.num_classes,
            "num_cameras": self.num_cameras,
        }

    def save_last(self) -> None:
        if self.ctx.is_main:
            self.ckpt.save_checkpoint(self.run_dir / "checkpoints" / "last.pt", self._state())

    def save_weights(self, name: str, epoch: int, metrics: dict | None) -> None:
        if self.ctx.is_main:
            payload = _weights_payload(self.cfg, self.model, self.criterion, epoch=epoch, metrics=metrics,
                                       num_classes=self.num_classes, num_cameras=self.num_cameras)
            self.ckpt.save_checkpoint(self.run_dir / "checkpoints" / name, payload)

    # -- evaluation --------------------------------------------------------------------------

    def evaluate(self, epoch: int) -> dict | None:
        metrics = None
        if self.ctx.is_main:
            t0 = time.perf_counter()
            metrics = evaluate_model(self.cfg, self.model, self.splits, self.ctx.device, amp="none",
                                     loaders=self.eval_loaders)
            record = {"epoch": epoch, **metrics}
            self.progress.history.append(record)
            self.metrics_log.log("eval", global_step=self.progress.global_step, epoch=epoch, **metrics)
            log.info("epoch %d evaluation (%.1fs): mAP %.2f%%  Rank-1 %.2f%%  Rank-5 %.2f%%  Rank-10 %.2f%%  mINP %.2f%%",
                     epoch, time.perf_counter() - t0, *(100 * metrics[k] for k in METRIC_KEYS))
            if epoch > 0 and (self.progress.best is None or metrics["mAP"] >= self.progress.best["metrics"]["mAP"]):
                self.progress.best = {"epoch": epoch, "metrics": metrics}
                self.save_weights("best.pt", epoch, metrics)
        du.barrier(self.ctx)
        return du.broadcast_object(self.ctx, metrics)

    # -- the loop ----------------------------------------------------------------------------

    def run(self, resume_rng) -> None:
        cfg, p = self.cfg, self.progress
        max_epochs = cfg.solver.max_epochs
        if p.epoch >= max_epochs:
            log.info("the run already finished %d of %d epochs; nothing to train", p.epoch, max_epochs)
            return
        for epoch in range(p.epoch + 1, max_epochs + 1):
            skip = p.step if epoch == p.epoch + 1 else 0
            self.train_epoch(epoch, skip, resume_rng if skip else None)
            period = cfg.solver.eval_period
            if epoch == max_epochs or (period > 0 and epoch % period == 0):
                self.evaluate(epoch)
            cp = cfg.solver.checkpoint_period
            if cp > 0 and epoch % cp == 0:
                evaluated = p.history[-1] if p.history and p.history[-1]["epoch"] == epoch else None
                self.save_weights(f"epoch_{epoch}.pt", epoch, evaluated)
            p.epoch, p.step, p.epoch_sums, p.epoch_time = epoch, 0, {}, 0.0
            self.save_last()
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch)

    def train_epoch(self, epoch: int, skip: int, rng_state) -> None:
        cfg, p, ctx = self.cfg, self.progress, self.ctx
        seed_everything(_epoch_seed(cfg.solver.seed, epoch, ctx.rank))
        self.loader.generator.manual_seed(_epoch_seed(cfg.solver.seed, epoch, ctx.rank + 1_000_003))
        self.sampler.set_epoch(epoch)
        self.scheduler.step(epoch)
        steps = self._steps_in_epoch()
        self.model.train()
        self.criterion.train()
        lr = self._lr()
        sums: dict[str, torch.Tensor] = {k: torch.tensor(v, device=ctx.device, dtype=torch.float64)
                                         for k, v in p.epoch_sums.items()}
        it = iter(self.loader)
        for _ in range(skip):  # replay the loader so sampler and worker RNG streams line up
            next(it)
        if rng_state is not None:
            self.ckpt.restore_rng_state(rng_state)
        started = time.perf_counter() - p.epoch_time
        checkpoint_steps = getattr(cfg.solver, "checkpoint_steps", 0)
        log_period = max(1, cfg.solver.log_period)
        bar = _progress_bar(steps, skip, f"epoch {epoch}/{cfg.solver.max_epochs}", ctx.is_main)
        try:
            for step in range(skip + 1, steps + 1):
                batch = next(it)
                terms = self.train_step(batch, epoch, step)
                for k, v in terms.items():
                    sums[k] = sums.get(k, torch.zeros((), device=ctx.device, dtype=torch.float64)) + v.detach().double()
                p.global_step += 1
                if step % log_period == 0 or step == steps:
                    values = {k: float(v.detach()) for k, v in terms.items()}
                    self.metrics_log.log("train", global_step=p.global_step, epoch=epoch, step=step, lr=lr, **values)
                    bar.set_postfix(loss=f"{values['total']:.3f}", lr=f"{lr:.2e}",
                                    eta=_format_eta(self._eta(epoch, step, steps, started)), refresh=False)
                bar.update(1)
                if checkpoint_steps > 0 and step % checkpoint_steps == 0 and step < steps:
                    self.synchronise_ranks()
                    p.step = step
                    p.epoch_sums = {k: float(v) for k, v in sums.items()}
                    p.epoch_time = time.perf_counter() - started
                    self.save_last()
                if self.on_step is not None:
                    self.on_step(epoch, step)
        finally:
            bar.close()
        self.synchronise_ranks()
        elapsed = time.perf_counter() - started
        self.epoch_times.append(elapsed)
        means = {k: float(v) / steps for k, v in sums.items()}
        self.metrics_log.log("epoch", global_step=p.global_step, epoch=epoch, lr=lr, seconds=round(elapsed, 3),
                             **{f"loss_{k}": v for k, v in means.items()})
        if ctx.is_main:
            terms_text = "  ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "total")
            log.info("epoch %d/%d: loss %.4f (%s), lr %.2e, %.1fs", epoch, cfg.solver.max_epochs,
                     means.get("total", float("nan")), terms_text, lr, elapsed)

    def synchronise_ranks(self) -> None:
        """Give every rank rank 0's buffers and check that the ranks hold the same state.

        Called before each ``last.pt`` is written (by rank 0 alone), so the checkpoint holds the
        state of every rank and a resumed run starts where each rank left off. Parameters and
        optimiser state are identical by construction (DDP); BatchNorm statistics without
        model.sync_bn and OCFR centres with model.ocfr_scope=local are not, until copied here.
        """
        if not self.ctx.distributed:
            return
        model = _unwrap(self.model)
        du.sync_from_main(self.ctx, model, self.criterion)
        du.assert_same_across_ranks(self.ctx, model.named_parameters(), "parameter")
        du.assert_same_across_ranks(self.ctx, self.criterion.named_buffers(), "OCFR centre buffer")

    def train_step(self, batch: dict, epoch: int, step: int) -> dict[str, torch.Tensor]:
        from editor_reid.engine.solver import autocast_context

        device = self.ctx.device
        images = batch_images(batch, device, self.modalities)
        targets = batch["pid"].to(device, non_blocking=True)
        cams = batch["camid"].to(device, non_blocking=True)
        with autocast_context(device, self.cfg.solver.amp):
            out = self.model(images, cams)
            total, terms = self.criterion(out, targets)
        terms = self._global_terms({**terms, "total": total})
        self._check_finite(terms, epoch, step)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return terms

    def _global_terms(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The loss values of the global batch: the mean over ranks of their shards' values
        (shards are equal, and each term is a mean over its shard), detached, for logging.
        Every rank gets the same values, so a NaN on any rank stops them all at the same step."""
        if not self.ctx.distributed:
            return terms
        names = list(terms)
        values = du.all_reduce_mean(self.ctx, torch.stack([terms[k].detach().float() for k in names]))
        return dict(zip(names, values.unbind()))

    def _check_finite(self, terms: dict[str, torch.Tensor], epoch: int, step: int) -> None:
        """Stop on a NaN/inf loss before it reaches the weights (one host sync per step).

        Under DDP ``terms`` are the global values (:meth:`_global_terms`), the same on every
        rank, so all ranks stop together instead of the others waiting forever in backward."""
        try:
            nonfinite_check(terms, epoch, step)
        except NonFiniteLossError:
            log.error("non-finite loss at epoch %d, step %d; stopping. The last good state is %s", epoch, step,
                      self.run_dir / "checkpoints" / "last.pt")
            raise

    def _lr(self) -> float:
        """The LR of the weight group (bias groups run at solver.bias_lr_factor times it)."""
        groups = self.optimizer.param_groups
        plain = [g["lr"] for g in groups if g.get("lr_factor", 1.0) == 1.0]
        return plain[0] if plain else groups[0]["lr"]

    def _steps_in_epoch(self) -> int:
        """Optimiser steps of the current epoch (the P×K plan's batch count varies by epoch)."""
        cap = self.cfg.solver.max_steps_per_epoch
        steps = min(len(self.loader), cap) if cap > 0 else len(self.loader)
        if steps == 0:
            raise ValueError(
                f"the training loader yields no batch: {len(self.splits.train)} train samples cannot fill one P×K "
                f"batch of solver.ims_per_batch={self.cfg.solver.ims_per_batch} "
                f"(dataloader.num_instance={self.cfg.dataloader.num_instance})"
            )
        return steps

    def _eta(self, epoch: int, step: int, steps: int, started: float) -> float:
        """Seconds left in the run, assuming later epochs take as many steps as this one."""
        per_step = (time.perf_counter() - started) / max(step, 1)
        return per_step * ((steps - step) + (self.cfg.solver.max_epochs - epoch) * steps)

    # -- summary -----------------------------------------------------------------------------

    def summary(self) -> dict:
        p = self.progress
        trained = [r for r in p.history if r["epoch"] > 0]
        final = trained[-1] if trained else None
        untrained = next((r for r in p.history if r["epoch"] == 0), None)
        return {
            "run_dir": str(self.run_dir),
            "epochs": p.epoch,
            "final": _split_record(final),
            "best": _split_record({"epoch": p.best["epoch"], **p.best["metrics"]}) if p.best else None,
            "untrained": _split_record(untrained),
            "history": list(p.history),
            "seconds_per_epoch": (sum(self.epoch_times) / len(self.epoch_times)) if self.epoch_times else None,
        }


def _split_record(record: dict | None) -> dict | None:
    if record is None:
        return None
    return {"epoch": record["epoch"], "metrics": {k: record[k] for k in METRIC_KEYS}}


def _progress_bar(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    # ``disable`` is passed only to switch the bar off, so TQDM_DISABLE=1 still works otherwise.
    kwargs = {} if enabled else {"disable": True}
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=False, unit="step", **kwargs)


def _format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _fmt(metrics: dict) -> str:
    return "  ".join(f"{name} {100 * metrics[k]:5.1f}" for name, k in
                     (("mAP", "mAP"), ("R-1", "rank1"), ("R-5", "rank5"), ("R-10", "rank10"), ("mINP", "mINP")))


def format_summary(summary: dict) -> str:
    lines = [f"run directory: {summary['run_dir']}"]
    if summary.get("untrained"):
        lines.append(f"untrained (epoch 0):  {_fmt(summary['untrained']['metrics'])}")
    if summary.get("final"):
        f = summary["final"]
        lines.append(f"final epoch {f['epoch']}:       {_fmt(f['metrics'])}   <- the honest figure")
    if summary.get("best"):
        b = summary["best"]
        lines.append(f"best epoch {b['epoch']} (test):  {_fmt(b['metrics'])}   <- selected on the test split, "
                     "as the official code reports")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- seeds


def train_seeds(cfg: Config, seeds: list[int], **kwargs) -> dict:
    """Train one run per seed in ``output_dir/seed_<s>`` and report mean ± std (sample std).

    A seed whose run directory already holds ``checkpoints/last.pt`` is resumed (and so
    skipped when it is finished), which makes an interrupted sweep restartable.
    """
    if not seeds:
        raise ConfigError("train --seeds: give at least one seed, e.g. --seeds 1111,2222,3333")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"train --seeds: seeds repeat: {seeds}")
    root = Path(cfg.output_dir)
    runs = {}
    # Under torchrun the seeds' runs share one process group (train() leaves a group it did not create).
    ctx = du.init_distributed(kwargs.get("device"))
    try:
        for seed in seeds:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.solver.seed = seed
            run_cfg.output_dir = str(root / f"seed_{seed}")
            resume = run_cfg.output_dir if (Path(run_cfg.output_dir) / "checkpoints" / "last.pt").exists() else None
            log.info("seed %d: %s%s", seed, run_cfg.output_dir, " (resuming)" if resume else "")
            runs[seed] = train(run_cfg, resume=resume, quiet=True, **kwargs)
    finally:
        du.shutdown_distributed(ctx)
    result = {"seeds": seeds, "runs": {str(s): r for s, r in runs.items()},
              "final": _aggregate([r["final"] for r in runs.values()]),
              "best": _aggregate([r["best"] for r in runs.values()])}
    if du.context_from_env()[0] == 0:
        import json

        root.mkdir(parents=True, exist_ok=True)
        (root / "seeds_summary.json").write_text(json.dumps(result, indent=2) + "\n")
        print(format_seeds(result))
    return result


def _aggregate(records: list[dict | None]) -> dict | None:
    if any(r is None for r in records) or not records:
        return None
    out = {}
    for k in METRIC_KEYS:
        values = [r["metrics"][k] for r in records]
        out[k] = {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                  "values": values}
    return out


def format_seeds(result: dict) -> str:
    lines = [f"{'seed':>6}  {'final ep':>8}  {'mAP':>6}  {'R-1':>6}  {'best ep':>7}  {'mAP':>6}  {'R-1':>6}"]
    for seed, run in result["runs"].items():
        f, b = run["final"], run["best"]
        lines.append(f"{seed:>6}  {f['epoch']:>8}  {100 * f['metrics']['mAP']:6.1f}  {100 * f['metrics']['rank1']:6.1f}"
                     f"  {b['epoch']:>7}  {100 * b['metrics']['mAP']:6.1f}  {100 * b['metrics']['rank1']:6.1f}")
    for label in ("final", "best"):
        agg = result[label]
        if agg is None:
            continue
        text = "  ".join(f"{name} {100 * agg[k]['mean']:.1f} ± {100 * agg[k]['std']:.1f}"
                         for name, k in (("mAP", "mAP"), ("R-1", "rank1"), ("R-5", "rank5"), ("mINP", "mINP")))
        note = ("the honest figure" if label == "final"
                else "best epoch per seed, selected on the test split as the official code reports")
        lines.append(f"{label:>5} (mean ± std over {len(result['seeds'])} seeds): {text}   <- {note}")
    return "\n".join(lines)

