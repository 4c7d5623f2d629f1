"""Training: :class:`Trainer` builds a run from its config and trains, evaluates and checkpoints it.

The parts come from their owners: the run directory and resume policy from
:mod:`~editor_reid.engine.rundir`, the checkpoint schema from :mod:`~editor_reid.engine.checkpoint`,
the P×K loader and the per-epoch seeding from :mod:`editor_reid.data.loaders`, the optimiser,
LR schedule and AMP from :mod:`~editor_reid.engine.solver`, the process group from
:mod:`~editor_reid.engine.distributed`.

Exact resume: an epoch's data order, augmentation and dropout depend only on (seed, epoch,
rank) (see :mod:`editor_reid.data.loaders`), so a run resumed from ``last.pt`` ends with the same
weights as an uninterrupted one on a deterministic device (CPU, or CUDA with
solver.deterministic). A checkpoint written in the middle of an epoch (solver.checkpoint_steps)
also stores the RNG state after its step; the resumed run replays the loader up to that step
without computing, then restores the RNGs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch

from editor_reid.config import Config, ConfigError, config_to_dict
from editor_reid.data.loaders import build_train_loader, seed_everything
from editor_reid.data.sources import load_configured
from editor_reid.data.validate import preflight
from editor_reid.engine import checkpoint as ckpt
from editor_reid.engine import distributed as du
from editor_reid.engine.acceleration import determinism, maybe_compile, release_freed_memory
from editor_reid.engine.inference import METRIC_KEYS, batch_images, build_eval_loaders, evaluate_model
from editor_reid.engine.interrupt import StopRequest
from editor_reid.engine.logging_utils import (
    MetricsLogger,
    ensure_console_log,
    file_log,
    format_eta,
    other_ranks_warn_only,
    progress_bar,
    write_environment,
)
from editor_reid.engine.progress import Progress
from editor_reid.engine.rng import restore_rng_state
from editor_reid.engine.rundir import initialisation, open_run_dir
from editor_reid.engine.solver import autocast_context, build_optimizer, build_scheduler, make_grad_scaler
from editor_reid.engine.tables import format_summary
from editor_reid.errors import TrainingInterrupted
from editor_reid.losses import EditorCriterion, NonFiniteLossError, check_finite
from editor_reid.model import build_model

__all__ = ["Trainer", "train"]

log = logging.getLogger(__name__)

StepHook = Callable[[int, int], None]
EpochHook = Callable[[int], None]


class Trainer:
    """Trains EDITOR as configured and returns a summary from :meth:`fit`.

    ``resume``: a run directory; training continues from its ``checkpoints/last.pt`` with its
    saved ``config.yaml`` (the command line may change only ``rundir.RESUMABLE_KEYS``).
    ``device``: "cpu" or "cuda" (default: CUDA when available). ``evaluate_untrained`` also
    evaluates the freshly initialised model (recorded as epoch 0). ``on_step(epoch, step)`` runs
    after every optimiser step and ``on_epoch_end(epoch)`` after each epoch's checkpoint is
    written (tests use them to interrupt a run).
    """

    def __init__(self, cfg: Config, resume: str | Path | None = None, *, device: str | None = None,
                 evaluate_untrained: bool = False, on_step: StepHook | None = None,
                 on_epoch_end: EpochHook | None = None) -> None:
        self.cfg = cfg
        self.resume = resume
        self.device = device
        self.evaluate_untrained = evaluate_untrained
        self.on_step = on_step
        self.on_epoch_end = on_epoch_end
        self.progress = Progress()
        self.epoch_times: list[float] = []

    # -- set-up ---------------------------------------------------------------------------------

    def fit(self) -> dict:
        """Build the run, train the remaining epochs, evaluate, checkpoint; return the summary.

        Raises :class:`~editor_reid.errors.TrainingInterrupted` after writing a checkpoint when
        SIGINT or SIGTERM arrives. A new run that fails before its first step leaves no run
        directory behind.
        """
        ensure_console_log()
        self.ctx = du.init_distributed(self.device)
        with ExitStack() as stack:
            stack.callback(du.shutdown_distributed, self.ctx)
            stack.enter_context(other_ranks_warn_only(self.ctx.is_main))
            self.run = open_run_dir(self.cfg, self.resume, rank=self.ctx.rank)
            self.cfg = self.run.cfg
            if self.ctx.is_main:
                stack.enter_context(self.run.removed_on_failure(lambda: self.progress.global_step > 0))
                self.run.create()
                stack.enter_context(file_log(self.run.path / "train.log"))
            du.check_world_size(self.cfg, self.ctx)
            stack.enter_context(determinism(self.cfg.solver.deterministic, self.ctx.device))
            self._build()
            resume_rng, metrics_offset = self._restore()
            self.metrics_log = MetricsLogger(
                self.run.path / "metrics.jsonl", enabled=self.ctx.is_main, truncate_to=metrics_offset or 0,
                tensorboard_dir=self.run.path / "tensorboard" if self.cfg.solver.tensorboard else None)
            stack.callback(self.metrics_log.close)
            self._write_run_files()
            self.stop = stack.enter_context(StopRequest())
            if self.evaluate_untrained and self.progress.epoch == 0 and self.progress.step == 0:
                self.evaluate(0)
            self._run_epochs(resume_rng)
        return self.summary()

    def _build(self) -> None:
        """Data, loaders, model, criterion, optimiser, schedule and scaler, from the config."""
        cfg, ctx = self.cfg, self.ctx
        seed_everything(cfg.solver.seed)
        self.splits = load_configured(cfg.datasets)
        # Stat every file the run will read now, rather than fail on a missing one mid-epoch.
        preflight(self.splits, ("train", "query", "gallery") if ctx.is_main else ("train",), cfg.datasets.modalities)
        self.num_classes, self.num_cameras = self.splits.num_train_pids, self.splits.num_cameras
        self.loader = build_train_loader(cfg, self.splits, rank=ctx.rank, world_size=ctx.world_size)
        self.eval_loaders = build_eval_loaders(cfg, self.splits) if ctx.is_main else None
        model = build_model(cfg, self.num_classes, self.num_cameras, pretrained=not self.run.resumed).to(ctx.device)
        self.criterion = EditorCriterion(cfg, self.num_classes, model.embed_dim, **du.criterion_hooks(ctx))
        self.criterion.to(ctx.device)
        self.model = du.wrap_model(ctx, maybe_compile(model, cfg), sync_bn=cfg.model.sync_bn)
        self.optimizer = build_optimizer(cfg, du.unwrap_model(self.model))
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.scaler = make_grad_scaler(ctx.device, cfg.solver.amp)

    def _parts(self) -> dict:
        return {"model": du.unwrap_model(self.model), "criterion": self.criterion, "optimizer": self.optimizer,
                "scheduler": self.scheduler, "scaler": self.scaler, "sampler": self.loader}

    def _restore(self) -> tuple[dict | None, int | None]:
        """Load ``last.pt`` of a resumed run; returns (RNG state, metrics-log offset)."""
        if not self.run.resumed:
            return None, None
        state, _ = ckpt.load_training_state(self.run.last_state)
        kept = ckpt.restore_training_state(state, **self._parts())
        self.progress = Progress(**kept["progress"])
        log.info("resuming %s from epoch %d%s", self.run.path, self.progress.epoch,
                 f", step {self.progress.step}" if self.progress.step else "")
        return kept["rng"], kept["metrics_offset"]

    def _write_run_files(self) -> None:
        du.barrier(self.ctx)  # every rank has read config.yaml and last.pt before rank 0 rewrites the run files
        if not self.ctx.is_main:
            return
        self.run.write_config()
        write_environment(self.run.environment_file(self.progress.epoch), self.ctx.device,
                          world_size=self.ctx.world_size, initialisation=initialisation(self.cfg))
        s = self.splits
        log.info("run directory: %s", self.run.path.resolve())
        log.info("data: %s, %d train IDs, %d cameras, %d train / %d query / %d gallery samples",
                 s.name, self.num_classes, self.num_cameras, len(s.train), len(s.query), len(s.gallery))

    # -- checkpoints ------------------------------------------------------------------------------

    def save_last(self) -> None:
        if self.ctx.is_main:
            state = ckpt.capture_training_state(
                **self._parts(), progress=dataclasses.asdict(self.progress), config=config_to_dict(self.cfg),
                metrics_offset=self.metrics_log.offset(), num_classes=self.num_classes, num_cameras=self.num_cameras)
            ckpt.save_checkpoint(self.run.last_state, state, keep_previous=True)

    def save_weights(self, name: str, epoch: int, metrics: dict | None) -> None:
        if self.ctx.is_main:
            payload = ckpt.weights_payload(
                du.unwrap_model(self.model).state_dict(), self.criterion.state_dict(), config=config_to_dict(self.cfg),
                epoch=epoch, metrics=metrics, num_classes=self.num_classes, num_cameras=self.num_cameras)
            ckpt.save_checkpoint(self.run.checkpoints / name, payload)

    def synchronise_ranks(self) -> None:
        """Give every rank rank 0's buffers and check that the ranks hold the same state.

        Called before each ``last.pt`` is written (by rank 0 alone), so the checkpoint holds the
        state of every rank. Parameters and optimiser state are identical by construction (DDP);
        BatchNorm statistics without model.sync_bn and OCFR centres with model.ocfr_scope=local
        are not, until copied here.
        """
        if not self.ctx.distributed:
            return
        model = du.unwrap_model(self.model)
        du.sync_from_main(self.ctx, model, self.criterion)
        du.assert_same_across_ranks(self.ctx, model.named_parameters(), "parameter")
        du.assert_same_across_ranks(self.ctx, self.criterion.named_buffers(), "OCFR centre buffer")

    # -- evaluation -------------------------------------------------------------------------------

    def evaluate(self, epoch: int) -> dict | None:
        """Evaluate on the test split (rank 0); record it and keep ``best.pt``; all ranks get the metrics."""
        metrics = None
        if self.ctx.is_main:
            t0 = time.perf_counter()
            metrics = evaluate_model(self.cfg, self.model, self.splits, self.ctx.device, loaders=self.eval_loaders)
            release_freed_memory()  # else every evaluation leaves the heap larger (docs/performance.md)
            self.metrics_log.log("eval", global_step=self.progress.global_step, epoch=epoch, **metrics)
            log.info("epoch %d evaluation (%.1fs): mAP %.2f%%  Rank-1 %.2f%%  Rank-5 %.2f%%  Rank-10 %.2f%%  "
                     "mINP %.2f%%", epoch, time.perf_counter() - t0, *(100 * metrics[k] for k in METRIC_KEYS))
            if self.progress.record_evaluation(epoch, metrics):
                self.save_weights("best.pt", epoch, metrics)
        du.barrier(self.ctx)
        return du.broadcast_object(self.ctx, metrics)

    # -- the loop ---------------------------------------------------------------------------------

    def _run_epochs(self, resume_rng: dict | None) -> None:
        s, p = self.cfg.solver, self.progress
        if p.epoch >= s.max_epochs:
            log.info("the run already finished %d of %d epochs; nothing to train", p.epoch, s.max_epochs)
            return
        for epoch in range(p.epoch + 1, s.max_epochs + 1):
            skip = p.step if epoch == p.epoch + 1 else 0
            self.train_epoch(epoch, skip, resume_rng if skip else None)
            if epoch == s.max_epochs or (s.eval_period > 0 and epoch % s.eval_period == 0):
                self.evaluate(epoch)
            if s.checkpoint_period > 0 and epoch % s.checkpoint_period == 0:
                self.save_weights(f"epoch_{epoch}.pt", epoch, p.evaluation_of(epoch))
            p.finish_epoch(epoch)
            self.save_last()
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch)
            if self.stop.agreed(self.ctx) and epoch < s.max_epochs:
                raise self._interrupted(epoch, None)

    def train_epoch(self, epoch: int, skip: int = 0, rng_state: dict | None = None) -> None:
        """One epoch; ``skip`` steps already done before a mid-epoch checkpoint with ``rng_state``."""
        s, p, device = self.cfg.solver, self.progress, self.ctx.device
        self.loader.set_epoch(epoch)
        self.scheduler.step(epoch)
        steps = self._steps_in_epoch()
        self.model.train()
        self.criterion.train()
        sums = {k: torch.tensor(v, device=device, dtype=torch.float64) for k, v in p.epoch_sums.items()}
        batches = iter(self.loader)
        for _ in range(skip):  # replay the loader so sampler and worker RNG streams line up
            next(batches)
        if rng_state is not None:
            restore_rng_state(rng_state)
        started = time.perf_counter() - p.epoch_time
        bar = progress_bar(steps, skip, f"epoch {epoch}/{s.max_epochs}", self.ctx.is_main)
        try:
            for step in range(skip + 1, steps + 1):
                terms = self.train_step(next(batches), epoch, step)
                for k, v in terms.items():
                    sums[k] = sums.get(k, torch.zeros((), device=device, dtype=torch.float64)) + v.detach().double()
                p.global_step += 1
                if step % max(1, s.log_period) == 0 or step == steps:
                    values = {k: float(v.detach()) for k, v in terms.items()}
                    lr = self._lr()
                    self.metrics_log.log("train", global_step=p.global_step, epoch=epoch, step=step, lr=lr, **values)
                    bar.set_postfix(loss=f"{values['total']:.3f}", lr=f"{lr:.2e}", refresh=False,
                                    eta=format_eta(self._eta(epoch, step, steps, started)))
                bar.update(1)
                stop = self.stop.agreed(self.ctx)
                if stop or (s.checkpoint_steps > 0 and step % s.checkpoint_steps == 0 and step < steps):
                    self.synchronise_ranks()
                    p.step, p.epoch_time = step, time.perf_counter() - started
                    p.epoch_sums = {k: float(v) for k, v in sums.items()}
                    self.save_last()
                if stop:
                    raise self._interrupted(epoch, step)
                if self.on_step is not None:
                    self.on_step(epoch, step)
        finally:
            bar.close()
        self.synchronise_ranks()
        self._end_epoch(epoch, {k: float(v) / steps for k, v in sums.items()}, time.perf_counter() - started)

    def _end_epoch(self, epoch: int, means: dict[str, float], elapsed: float) -> None:
        self.epoch_times.append(elapsed)
        lr = self._lr()
        self.metrics_log.log("epoch", global_step=self.progress.global_step, epoch=epoch, lr=lr,
                             seconds=round(elapsed, 3), **{f"loss_{k}": v for k, v in means.items()})
        if self.ctx.is_main:
            terms_text = "  ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "total")
            log.info("epoch %d/%d: loss %.4f (%s), lr %.2e, %.1fs", epoch, self.cfg.solver.max_epochs,
                     means.get("total", float("nan")), terms_text, lr, elapsed)

    def train_step(self, batch: dict, epoch: int, step: int) -> dict[str, torch.Tensor]:
        """Forward, losses, the non-finite check, backward and the optimiser step; returns the terms."""
        device = self.ctx.device
        images = batch_images(batch, device)
        targets = batch["pid"].to(device, non_blocking=True)
        cams = batch["camid"].to(device, non_blocking=True)
        with autocast_context(device, self.cfg.solver.amp):
            out = self.model(images, cams)
            total, terms = self.criterion(out, targets)
        # The loss values of the global batch: each term is a mean over an equal shard.
        terms = du.mean_over_ranks(self.ctx, {**terms, "total": total})
        try:
            # Under DDP the terms are the global values, the same on every rank, so all ranks stop
            # together instead of the others waiting forever in backward.
            check_finite(terms, epoch, step)
        except NonFiniteLossError:
            log.error("non-finite loss at epoch %d, step %d; stopping. The last good state is %s", epoch, step,
                      self.run.last_state)
            raise
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return terms

    def _interrupted(self, epoch: int, step: int | None) -> TrainingInterrupted:
        where = f"epoch {epoch}, step {step}" if step is not None else f"the end of epoch {epoch}"
        return self.stop.interrupted(where, self.run.last_state, self.run.path)

    def _lr(self) -> float:
        """The LR of the weight group (bias groups run at solver.bias_lr_factor times it)."""
        groups = self.optimizer.param_groups
        plain = [g["lr"] for g in groups if g["lr_factor"] == 1.0]
        return plain[0] if plain else groups[0]["lr"]

    def _steps_in_epoch(self) -> int:
        """Optimiser steps of the current epoch (the P×K plan's batch count varies by epoch)."""
        cap = self.cfg.solver.max_steps_per_epoch
        steps = min(len(self.loader), cap) if cap > 0 else len(self.loader)
        if steps == 0:
            raise ConfigError(
                f"the training loader yields no batch: {len(self.splits.train)} train samples cannot fill one P×K "
                f"batch of solver.ims_per_batch={self.cfg.solver.ims_per_batch} "
                f"(dataloader.num_instance={self.cfg.dataloader.num_instance})")
        return steps

    def _eta(self, epoch: int, step: int, steps: int, started: float) -> float:
        """Seconds left in the run, assuming later epochs take as many steps as this one."""
        per_step = (time.perf_counter() - started) / max(step, 1)
        return per_step * ((steps - step) + (self.cfg.solver.max_epochs - epoch) * steps)

    # -- summary ----------------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main

    def summary(self) -> dict:
        """Final, best and untrained evaluations, the history and the mean epoch time."""
        return self.progress.summary(str(self.run.path), self.epoch_times)


def train(cfg: Config, resume: str | Path | None = None, *, quiet: bool = False, **options) -> dict:
    """Train with :class:`Trainer` and print the summary table (unless ``quiet``); returns the summary.

    ``options`` are :class:`Trainer`'s keyword arguments.
    """
    trainer = Trainer(cfg, resume, **options)
    summary = trainer.fit()
    if trainer.is_main and not quiet:
        print(format_summary(summary))
    return summary
