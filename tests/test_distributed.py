"""Multi-process training (DDP, Gloo on CPU) against one process on the global batch.

Two kinds of launch, each with two CPU ranks:
- ``torchrun -m editor_reid train`` exactly as a user runs it (one launch, one epoch);
- rank processes forked from this test (tests/_ddp_worker.py), for the first-step checks of
  both scopes and for resuming the torchrun run, which saves importing torch twice more.

With augmentation and stochastic depth off, model.sync_bn on and the default "global" scopes,
a DDP step equals a single-process step on the same global batch up to float rounding, so
the two-process run is compared with a single-process run of the same config.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from editor_reid.config import dump_config, load_config
from editor_reid.data.synthetic import make_synthetic
from editor_reid.engine.checkpoint import load_checkpoint
from editor_reid.engine.evaluate import run_test
from editor_reid.engine.train import train

sys.path.insert(0, str(Path(__file__).parent))
import _ddp_worker  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with Gloo is not available")

WORLD = 2
# Deterministic steps: no stochastic depth, no augmentation, synchronised BatchNorm.
TINY = [
    "model.pretrain_choice=none", "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.drop_path=0",
    "model.head_keep=1", "model.frequency_keep=2", "model.sync_bn=true", "input.size_train=[64,32]",
    "input.size_test=[64,32]", "input.prob=0", "input.re_prob=0", "input.padding=0", "dataloader.num_workers=0",
    "dataloader.num_instance=2", "solver.ims_per_batch=8", "solver.warmup_iters=0", "solver.optimizer_name=SGD",
    "solver.base_lr=0.05", "solver.deterministic=true", "solver.max_steps_per_epoch=2", "solver.log_period=1",
    "solver.checkpoint_period=1", "solver.max_epochs=1", "test.ims_per_batch=64",
]
# Float rounding differs between one process and two (sums in another order): relative tolerances.
GRAD_RTOL = 1e-4
WEIGHT_ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fork_ranks(tmp: Path, steps: list[dict]) -> None:
    """Run ``steps`` (see tests/_ddp_worker.py) in two forked rank processes."""
    job = tmp / f"job_{free_port()}.json"
    job.write_text(json.dumps({"steps": steps}))
    mp.start_processes(_ddp_worker.run, args=(WORLD, free_port(), str(job)), nprocs=WORLD, start_method="fork")


def overrides(data_root, out, *extra) -> list[str]:
    return [*TINY, f"datasets.root_dir={data_root}", f"output_dir={out}", *extra]


def same_state(a: dict, b: dict, atol: float = WEIGHT_ATOL) -> None:
    for part in ("model", "criterion"):
        assert a[part].keys() == b[part].keys()
        for key, value in a[part].items():
            if value.is_floating_point():
                torch.testing.assert_close(value, b[part][key], rtol=1e-4, atol=atol, msg=f"{part}.{key} differs")
            else:
                assert torch.equal(value, b[part][key]), f"{part}.{key} differs"


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_synthetic("rgbnt201", root, ids=16, views=2, seed=0)
    return root


# ------------------------------------------------------------------- first step, both scopes


@pytest.fixture(scope="module")
def first_step(tmp_path_factory):
    """Rank reports of one DDP step per scope, against one process on the same global batch."""
    tmp = tmp_path_factory.mktemp("first_step")
    steps = [{"kind": "first_step", "seed": 3, "report": str(tmp / f"{scope}.json"),
              "overrides": [*TINY, f"model.triplet_scope={scope}", f"model.ocfr_scope={scope}"]}
             for scope in ("global", "local")]
    fork_ranks(tmp, steps)
    return {scope: (json.loads((tmp / f"{scope}.json").read_text()), torch.load(tmp / f"{scope}.grads.pt"))
            for scope in ("global", "local")}


@pytest.mark.parametrize("scope", ["global", "local"])
def test_first_step_gradients_equal_single_process(first_step, scope):
    reports, _ = first_step[scope]
    for rank, report in enumerate(reports):
        assert report["bn_types"] == ["GlobalBatchNorm1d"]  # model.sync_bn on CPU
        assert report["grads_equal_across_ranks"], f"rank {rank}: DDP left different gradients on the ranks"
        assert report["num_params_with_grad"] > 10
        assert report["grad_rel_diff"] < GRAD_RTOL, (
            f"rank {rank}: gradient of {report['grad_rel_diff_param']} differs from one process on the global batch "
            f"by {report['grad_rel_diff']:.2e} (relative)")


def test_scopes_change_the_step(first_step):
    """Local mining sees only the rank's shard: the gradients differ from global mining."""
    global_grads, local_grads = first_step["global"][1], first_step["local"][1]
    diff, _ = _ddp_worker._max_rel_diff(local_grads, global_grads)
    assert diff > 1e-3


def test_global_ocfr_centres_are_the_global_batch_centres(first_step):
    reports, _ = first_step["global"]
    for report in reports:
        assert report["centres_equal_across_ranks"]
        assert report["centre_abs_diff_vs_reference"] < 1e-6
        assert report["check_before_sync"] == "passed"


def test_local_ocfr_centres_differ_until_synchronised(first_step):
    """ocfr_scope=local: each rank updates the centres of its own identities only; the engine
    copies rank 0's centres to every rank when it writes last.pt (the check names the buffer)."""
    reports, _ = first_step["local"]
    for report in reports:
        assert report["centre_abs_diff_vs_reference"] < 1e-6  # = one process on the rank's shard alone
        assert not report["centres_equal_across_ranks"]
        assert "differs from rank 0" in report["check_before_sync"] and "_centers" in report["check_before_sync"]
        assert report["centres_equal_after_sync"]


def test_divergent_weights_are_detected(first_step):
    reports, _ = first_step["global"]
    for report in reports:
        assert "parameter" in report["divergence_error"] and "rank 1" in report["divergence_error"]


# --------------------------------------------------------------------- torchrun training run


@pytest.fixture(scope="module")
def ddp_run(data_root, tmp_path_factory):
    """``torchrun --nproc_per_node=2 -m editor_reid train --config ...``: one epoch, evaluated."""
    tmp = tmp_path_factory.mktemp("ddp")
    out = tmp / "run"
    config = tmp / "tiny.yaml"
    config.write_text(dump_config(load_config(None, overrides=overrides(data_root, out))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "editor_reid", "train", "--config", str(config)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return out, proc


@pytest.fixture(scope="module")
def single_run(data_root, tmp_path_factory):
    """The same config in one process."""
    out = tmp_path_factory.mktemp("single") / "run"
    summary = train(load_config(None, overrides=overrides(data_root, out)), quiet=True, device="cpu")
    return out, summary


def test_only_rank_0_writes_the_run(ddp_run):
    out, proc = ddp_run
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["checkpoints/best.pt", "checkpoints/epoch_1.pt", "checkpoints/last.pt", "config.yaml",
                     "env.json", "metrics.jsonl", "report.html", "train.log"]
    kinds = [r["kind"] for r in records(out)]
    assert kinds.count("train") == 2 and kinds.count("epoch") == 1 and kinds.count("eval") == 1
    log = (out / "train.log").read_text()
    assert log.count("epoch 1/1: loss") == 1 and log.count("epoch 1 evaluation") == 1
    assert json.loads((out / "env.json").read_text())["world_size"] == WORLD
    # The summary is printed once, and the report written once, by rank 0.
    assert proc.stdout.count("run directory:") == 1
    assert proc.stdout.count(f"report: {out / 'report.html'}") == 1


def test_two_processes_train_like_one(ddp_run, single_run):
    """Same global batches, same weights: the ranks' shards and DDP averaging add up to one process."""
    ddp_state = load_checkpoint(ddp_run[0] / "checkpoints" / "last.pt")
    one_state = load_checkpoint(single_run[0] / "checkpoints" / "last.pt")
    same_state(ddp_state, one_state)
    ddp_losses = [r["total"] for r in records(ddp_run[0]) if r["kind"] == "train"]
    one_losses = [r["total"] for r in records(single_run[0]) if r["kind"] == "train"]
    assert ddp_losses == pytest.approx(one_losses, rel=1e-4)  # the logged loss is the global batch's


def test_evaluation_equals_single_process(ddp_run, single_run, data_root):
    out, _ = ddp_run
    ddp_eval = next(r for r in records(out) if r["kind"] == "eval")
    cfg = load_config(out / "config.yaml")
    again = run_test(cfg, out / "checkpoints" / "last.pt", device="cpu", quiet=True)
    for key in ("mAP", "rank1", "mINP"):
        assert ddp_eval[key] == pytest.approx(again[key], abs=1e-9)
        assert ddp_eval[key] == pytest.approx(single_run[1]["final"]["metrics"][key], abs=1e-6)


# ---------------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def resumed(ddp_run, data_root, tmp_path_factory):
    """The torchrun run resumed for one more epoch by two processes and by one; plus a
    two-process run with local scopes."""
    tmp = tmp_path_factory.mktemp("resume")
    two, one = tmp / "two", tmp / "one"
    shutil.copytree(ddp_run[0], two)
    shutil.copytree(ddp_run[0], one)
    local = tmp / "local"
    fork_ranks(tmp, [
        {"kind": "train", "config": str(two / "config.yaml"), "resume": str(two), "overrides": ["solver.max_epochs=2"]},
        {"kind": "train", "overrides": overrides(data_root, local, "model.triplet_scope=local",
                                                  "model.ocfr_scope=local", "model.sync_bn=false")},
    ])
    train(load_config(one / "config.yaml", overrides=["solver.max_epochs=2"]), resume=str(one), quiet=True,
          device="cpu")
    return two, one, local


def test_resume_two_processes_and_one_agree(resumed):
    two, one, _ = resumed
    a = load_checkpoint(two / "checkpoints" / "last.pt")
    b = load_checkpoint(one / "checkpoints" / "last.pt")
    assert a["progress"]["epoch"] == b["progress"]["epoch"] == 2
    assert a["progress"]["global_step"] == b["progress"]["global_step"] == 4
    same_state(a, b)
    kinds = [r["kind"] for r in records(two)]
    assert kinds.count("train") == 4 and kinds.count("epoch") == 2  # appended once, by rank 0


def test_local_scopes_run_and_checkpoint_synchronised_centres(resumed):
    """With local scopes the ranks' centres drift within an epoch; the run finishes only if the
    engine's check at the checkpoint finds them equal again (it raises otherwise)."""
    _, _, local = resumed
    state = load_checkpoint(local / "checkpoints" / "last.pt")
    assert state["config"]["model"]["ocfr_scope"] == "local"
    assert state["progress"]["epoch"] == 1
    assert any(v.abs().sum() > 0 for k, v in state["criterion"].items() if k.endswith("_centers"))


# ------------------------------------------------------------------------------- no launch


def test_global_batch_must_split_evenly_over_ranks(caplog):
    import logging

    from editor_reid.config import ConfigError
    from editor_reid.engine.distributed import DistContext
    from editor_reid.engine.distributed import check_world_size

    cfg = load_config(None, overrides=["solver.ims_per_batch=8", "dataloader.num_instance=4"])
    with pytest.raises(ConfigError, match="ims_per_batch=8"):
        check_world_size(cfg, DistContext(rank=0, world_size=3))
    cfg.model.triplet_scope = "local"
    with caplog.at_level(logging.WARNING, logger="editor_reid"):
        check_world_size(cfg, DistContext(rank=0, world_size=4))  # 2 images per rank, K = 4
    assert "splits identities" in caplog.text and "triplet_scope=local" in caplog.text
