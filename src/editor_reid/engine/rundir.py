"""The run directory: what a run writes where, when a directory may be (re)used, and resume.

Layout (``cfg.output_dir``, or the directory given to ``--resume``)::

    config.yaml          resolved configuration (the one a resumed run reads back)
    env.json             python / torch / timm versions, device, git commit (env.resume-<epoch>.json per resume)
    train.log            the log messages
    metrics.jsonl        one JSON record per logged step, epoch and evaluation
    tensorboard/         scalars, when solver.tensorboard is true
    checkpoints/last.pt  full training state after the last finished epoch (or step block)
    checkpoints/best.pt  weights + metrics of the best-mAP evaluation
    checkpoints/epoch_{n}.pt  weights every solver.checkpoint_period epochs

A new run refuses a directory that already holds ``checkpoints/last.pt`` (continue it with
``--resume`` instead), and removes the directory it created when it fails before its first
step. ``--resume auto`` resumes ``output_dir`` when it holds a run and starts one there
otherwise (for job arrays that requeue the same command). A resumed run takes its
configuration from the run's own ``config.yaml``; the command line may change only the keys of
:data:`RESUMABLE_KEYS`.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from editor_reid.config import Config, ConfigError, config_from_dict, config_to_dict, dump_config

__all__ = ["RESUMABLE_KEYS", "RunDir", "open_run_dir", "resume_config", "last_state_path", "initialisation", "flat_keys",
           "is_resumable"]

log = logging.getLogger(__name__)

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
    "datasets.manifest",
    "test.",
)


def last_state_path(run_dir: str | Path) -> Path:
    """``RUN_DIR/checkpoints/last.pt``: the training state a resume starts from."""
    return Path(run_dir) / "checkpoints" / "last.pt"


@dataclass(frozen=True)
class RunDir:
    """A run directory and the config the run uses (a resume's comes from the directory)."""

    path: Path
    cfg: Config
    resumed: bool

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_state(self) -> Path:
        return last_state_path(self.path)

    def create(self) -> None:
        """Create the directory and its ``checkpoints/`` (main rank only)."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def write_config(self) -> None:
        """``config.yaml``, headed by a comment saying how the model was initialised."""
        header = f"# initialisation: {initialisation(self.cfg)}\n"
        (self.path / "config.yaml").write_text(header + dump_config(self.cfg))

    @contextlib.contextmanager
    def removed_on_failure(self, used: Callable[[], bool]) -> Iterator[None]:
        """Remove the directory of a new run if the block fails before ``used()`` (its first step),
        unless it existed before: a failed start leaves nothing half-made behind."""
        created = not self.resumed and not self.path.exists()
        try:
            yield
        except BaseException:
            if created and not used():
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    def environment_file(self, resumed_at_epoch: int) -> Path:
        """``env.json`` for a new run; a resumed run keeps it and writes ``env.resume-<epoch>.json``."""
        return self.path / (f"env.resume-{resumed_at_epoch}.json" if self.resumed else "env.json")


def open_run_dir(cfg: Config, resume: str | Path | None = None, *, rank: int = 0) -> RunDir:
    """The run directory of a new run (``cfg.output_dir``) or of the run in ``resume``
    (``"auto"``: ``cfg.output_dir``'s run if it has one, else a new run there).

    Raises ConfigError when a new run would overwrite a run, FileNotFoundError when ``resume``
    holds no training state. ``rank`` only refines the message on a multi-machine job.
    """
    if resume == "auto":
        resume = cfg.output_dir if last_state_path(cfg.output_dir).is_file() else None
        log.info("--resume auto: %s", f"resuming {resume}" if resume else f"no run in {cfg.output_dir}; starting one")
    if resume is None:
        path = Path(cfg.output_dir)
        if last_state_path(path).exists():
            raise ConfigError(
                f"output_dir '{path}' already holds a run (checkpoints/last.pt); continue it with "
                f"`--resume {path}` or choose another directory with output_dir=..."
            )
        if cfg.model.pretrain_choice != "none" and not cfg.model.pretrain_path:
            log.warning("model.pretrain_choice is '%s' but model.pretrain_path is empty: training starts from RANDOM "
                        "initialisation, far below the published accuracy; pass the weights file with "
                        "model.pretrain_path=PATH (or set model.pretrain_choice=none)", cfg.model.pretrain_choice)
        return RunDir(path, cfg, resumed=False)
    path = Path(resume)
    cfg = resume_config(path, cfg)
    if not last_state_path(path).is_file():
        shared = "" if rank == 0 else (f" (seen from rank {rank}: with several machines the run directory "
                                       "must be on a filesystem they all see)")
        raise FileNotFoundError(f"cannot resume: {last_state_path(path)} does not exist{shared}")
    return RunDir(path, cfg, resumed=True)


def initialisation(cfg: Config) -> str:
    """How the run's model starts: from which pretrained file, or from random weights and why."""
    m = cfg.model
    if m.pretrain_choice == "none":
        return "random (model.pretrain_choice is none)"
    if not m.pretrain_path:
        return f"random (model.pretrain_choice is {m.pretrain_choice} but model.pretrain_path is empty)"
    return f"{m.pretrain_choice} weights from {m.pretrain_path}"


def is_resumable(key: str) -> bool:
    """Whether a resume may change the dotted config ``key`` (:data:`RESUMABLE_KEYS`)."""
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in RESUMABLE_KEYS)


def flat_keys(d: dict, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"section.key": value}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_keys(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_config(run_dir: str | Path, cfg: Config) -> Config:
    """The config of the run in ``run_dir`` with the command line's resumable keys applied.

    Keys outside :data:`RESUMABLE_KEYS` that differ between ``cfg`` and the saved config are
    ignored with a warning naming them; ``output_dir`` is always ``run_dir``.
    """
    run_dir = Path(run_dir)
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume: {path} does not exist (is '{run_dir}' a run directory?)")
    saved = config_from_dict(yaml.safe_load(path.read_text()), source=str(path))
    saved_flat, new_flat = flat_keys(config_to_dict(saved)), flat_keys(config_to_dict(cfg))
    taken, ignored = [], []
    for key, value in new_flat.items():
        if key == "output_dir" or saved_flat.get(key) == value:
            continue
        if is_resumable(key):
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
