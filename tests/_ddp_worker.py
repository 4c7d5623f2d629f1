"""The rank processes of tests/test_distributed.py (2 CPU ranks, Gloo).

``run(rank, world_size, port, job)`` is started once per rank by
``torch.multiprocessing.start_processes``; it joins a Gloo process group and runs the steps
listed in the JSON file ``job``:

- ``first_step``: one DDP step on a fixed global P×K batch, built from the engine's own
  pieces (``build_model``, ``EditorCriterion`` with ``distributed.criterion_hooks``,
  ``distributed.wrap_model``), against the same step of one process on the whole batch.
  Rank 0 writes a JSON report of the differences.
- ``train``: ``editor_reid.engine.train.train`` on both ranks (a fresh run or a resume).

A failing assertion or exception in a rank fails the launch, with that rank's traceback.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from editor_reid.config import load_config
from editor_reid.modalities import MODALITIES
from editor_reid.engine import distributed as du
from editor_reid.losses import EditorCriterion
from editor_reid.model import build_model

NUM_CLASSES = 8
NUM_CAMERAS = 2


def run(rank: int, world_size: int, port: int, job: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    spec = json.loads(Path(job).read_text())
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        ctx = du.init_distributed("cpu")
        assert ctx.distributed and not ctx.owns_group and ctx.rank == rank
        for step in spec["steps"]:
            if step["kind"] == "first_step":
                first_step(ctx, step)
            elif step["kind"] == "train":
                from editor_reid.engine.train import train

                cfg = load_config(step.get("config"), overrides=step["overrides"])
                train(cfg, resume=step.get("resume"), quiet=True, device="cpu")
                assert dist.is_initialized(), "train() destroyed a process group it did not create"
            else:
                raise ValueError(f"unknown step {step['kind']!r}")
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------- first step


def _global_batch(cfg, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """A P×K batch of random images: K contiguous images for each of P distinct identities."""
    g = torch.Generator().manual_seed(seed)
    batch, k = cfg.solver.ims_per_batch, cfg.dataloader.num_instance
    ids = torch.randperm(NUM_CLASSES, generator=g)[: batch // k]
    pids = ids.repeat_interleave(k)
    h, w = cfg.input.size_train
    images = {m: torch.randn(batch, 3, h, w, generator=g) for m in MODALITIES}
    cams = torch.randint(0, NUM_CAMERAS, (batch,), generator=g)
    return images, pids, cams


def _rows(value, rows: slice):
    """``value`` (a tensor, or a list/dict of them) restricted to the batch rows ``rows``."""
    if torch.is_tensor(value):
        return value[rows]
    if isinstance(value, list):
        return [_rows(v, rows) for v in value]
    if isinstance(value, dict):
        return {k: _rows(v, rows) for k, v in value.items()}
    return value


def _shard(out, rows: slice):
    return dataclasses.replace(out, **{f.name: _rows(getattr(out, f.name), rows) for f in dataclasses.fields(out)})


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest |a - b| over a parameter, relative to the largest |b| of that parameter.

    The scale has a floor of 1e-3 of the largest gradient in the model: some gradients are
    zero in exact arithmetic (a bias followed by a normalisation) and only rounding noise here.
    """
    floor = 1e-3 * max(float(g.abs().max()) for g in b.values())
    worst, where = 0.0, ""
    for name in b:
        scale = max(float(b[name].abs().max()), floor)
        diff = float((a[name] - b[name]).abs().max()) / scale
        if diff > worst:
            worst, where = diff, name
    return worst, where


def _centres(criterion: EditorCriterion) -> dict[str, torch.Tensor]:
    return {m: criterion.ocfr.centers(m).detach().clone() for m in MODALITIES}


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def first_step(ctx: du.DistContext, step: dict) -> None:
    cfg = load_config(None, overrides=step["overrides"])
    scope = cfg.model.triplet_scope
    assert cfg.model.ocfr_scope == scope
    images, pids, cams = _global_batch(cfg, seed=step["seed"])
    local = cfg.solver.ims_per_batch // ctx.world_size
    mine = slice(ctx.rank * local, (ctx.rank + 1) * local)
    shards = [slice(r * local, (r + 1) * local) for r in range(ctx.world_size)]

    torch.manual_seed(0)
    base = build_model(cfg, NUM_CLASSES, NUM_CAMERAS)
    dim = base.embed_dim

    # One process, the whole global batch. "global": the criterion sees every sample;
    # "local": the loss DDP optimises is the mean over shards of each shard's own criterion.
    reference = copy.deepcopy(base).train()
    out = reference(images, cams)
    if scope == "global":
        ref_criteria = [EditorCriterion(cfg, NUM_CLASSES, dim)]
        ref_total, _ = ref_criteria[0](out, pids)
    else:
        ref_criteria = [EditorCriterion(cfg, NUM_CLASSES, dim) for _ in shards]
        ref_total = sum(c(_shard(out, s), pids[s])[0] for c, s in zip(ref_criteria, shards)) / len(shards)
    ref_total.backward()
    ref_grads = _grads(reference)
    ref_centres = _centres(ref_criteria[0] if scope == "global" else ref_criteria[ctx.rank])

    # The engine's pieces on this rank's shard.
    model = du.wrap_model(ctx, copy.deepcopy(base), sync_bn=cfg.model.sync_bn)
    criterion = EditorCriterion(cfg, NUM_CLASSES, dim, **du.criterion_hooks(ctx))
    model.train()
    out = model({m: x[mine] for m, x in images.items()}, cams[mine])
    total, _ = criterion(out, pids[mine])
    total.backward()
    grads = _grads(model.module)
    grad_diff, grad_where = _max_rel_diff(grads, ref_grads)
    flat_grads = torch.cat([g.flatten() for g in grads.values()])
    grads_equal_across_ranks = all(torch.equal(g, flat_grads) for g in _gather(flat_grads))

    centres = _centres(criterion)
    centre_diff = max(float((centres[m] - ref_centres[m]).abs().max()) for m in MODALITIES)
    flat_centres = torch.cat([c.flatten() for c in centres.values()])
    centres_equal_across_ranks = all(torch.equal(c, flat_centres) for c in _gather(flat_centres))

    # The engine's checkpoint-time synchronisation and its divergence check.
    check_before_sync = "passed"
    try:
        du.assert_same_across_ranks(ctx, criterion.named_buffers(), "OCFR centre buffer")
    except RuntimeError as exc:
        check_before_sync = str(exc)
    du.sync_from_main(ctx, model.module, criterion)
    synced = torch.cat([c.flatten() for c in _centres(criterion).values()])
    centres_equal_after_sync = all(torch.equal(c, synced) for c in _gather(synced))
    du.assert_same_across_ranks(ctx, criterion.named_buffers(), "OCFR centre buffer")

    # An optimiser step keeps the replicas identical; a rank that changes a weight on its own is caught.
    from editor_reid.engine.solver import build_optimizer

    build_optimizer(cfg, model.module).step()
    du.assert_same_across_ranks(ctx, model.module.named_parameters(), "parameter")
    if ctx.rank == 1:
        with torch.no_grad():
            next(model.module.parameters()).add_(1e-3)
    divergence_error = ""
    try:
        du.assert_same_across_ranks(ctx, model.module.named_parameters(), "parameter")
    except RuntimeError as exc:
        divergence_error = str(exc)

    bn_types = sorted({type(m).__name__ for m in model.module.modules() if isinstance(m, torch.nn.BatchNorm1d)})
    report = {
        "scope": scope,
        "sync_bn": cfg.model.sync_bn,
        "bn_types": bn_types,
        "grad_rel_diff": grad_diff,
        "grad_rel_diff_param": grad_where,
        "num_params_with_grad": sum(1 for g in ref_grads.values() if g.abs().max() > 0),
        "grads_equal_across_ranks": grads_equal_across_ranks,
        "centre_abs_diff_vs_reference": centre_diff,
        "centres_equal_across_ranks": centres_equal_across_ranks,
        "check_before_sync": check_before_sync,
        "centres_equal_after_sync": centres_equal_after_sync,
        "divergence_error": divergence_error,
        "grad_norm": float(flat_grads.norm()),
    }
    reports = [None] * ctx.world_size
    dist.all_gather_object(reports, report)
    if ctx.rank == 0:
        torch.save(grads, Path(step["report"]).with_suffix(".grads.pt"))
        Path(step["report"]).write_text(json.dumps(reports, indent=2))
