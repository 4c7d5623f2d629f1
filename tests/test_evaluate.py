"""``run_test`` on our checkpoints and official ones, missing-modality table, re-ranking,
and feature extraction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from editor_reid.config import load_config
from editor_reid.data.layouts import load_dataset
from editor_reid.data.loaders import build_test_loader
from editor_reid.data.synthetic import make_synthetic
from editor_reid.engine.checkpoint import load_checkpoint
from editor_reid.engine.evaluate import load_weights, run_test
from editor_reid.engine.inference import evaluate_model, extract_features
from editor_reid.modalities import modality_subsets
from editor_reid.engine.train import train
from editor_reid.model import build_model, to_official_state_dict

TINY = [
    "model.pretrain_choice=none", "model.embed_dim=64", "model.depth=2", "model.num_heads=2",
    "model.head_keep=1", "model.frequency_keep=2", "input.size_train=[64,32]", "input.size_test=[64,32]",
    "dataloader.num_workers=0", "dataloader.num_instance=2", "solver.ims_per_batch=8", "solver.warmup_iters=1",
    "solver.optimizer_name=SGD", "solver.base_lr=0.01", "solver.deterministic=true", "solver.max_steps_per_epoch=2",
    "solver.max_epochs=1", "test.ims_per_batch=64",
]
METRICS = {"mAP", "rank1", "rank5", "rank10", "mINP"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_synthetic("rgbnt201", root / "data", ids=12, views=2, seed=1)
    cfg = load_config(None, overrides=[*TINY, f"datasets.root_dir={root / 'data'}", f"output_dir={root / 'run'}"])
    summary = train(cfg, quiet=True)
    return cfg, root / "run", summary


def test_run_test_on_our_checkpoints(trained, tmp_path, capsys):
    cfg, run_dir, summary = trained
    out = tmp_path / "m.json"
    result = run_test(cfg, run_dir / "checkpoints" / "last.pt", json_out=out)
    printed = capsys.readouterr().out
    assert set(result) == METRICS
    assert all(0.0 <= v <= 1.0 for v in result.values())
    assert result == pytest.approx(summary["final"]["metrics"])  # the same numbers training reported
    assert json.loads(out.read_text()) == pytest.approx(result)
    assert "mAP" in printed and "R-1" in printed and "editor-reid checkpoint" in printed
    # best.pt holds the same (only) epoch's weights.
    assert run_test(cfg, run_dir / "checkpoints" / "best.pt", quiet=True) == pytest.approx(result)


def test_missing_all_prints_seven_subsets_and_average(trained, tmp_path, capsys):
    cfg, run_dir, _ = trained
    out = tmp_path / "missing.json"
    result = run_test(cfg, run_dir / "checkpoints" / "last.pt", missing="all", json_out=out)
    names = ["RGB", "NI", "TI", "RGB+NI", "RGB+TI", "NI+TI", "RGB+NI+TI"]
    assert list(result) == names + ["average"]
    for name in names:
        assert set(result[name]) == METRICS
    for key in METRICS:
        assert result["average"][key] == pytest.approx(np.mean([result[n][key] for n in names]))
    full = run_test(cfg, run_dir / "checkpoints" / "last.pt", quiet=True)
    assert result["RGB+NI+TI"] == pytest.approx(full)
    table = capsys.readouterr().out
    for name in names + ["average"]:
        assert any(line.startswith(name + " ") for line in table.splitlines()), name
    assert json.loads(out.read_text())["average"] == pytest.approx(result["average"])


def test_official_checkpoint_gives_the_same_metrics(trained, tmp_path):
    cfg, run_dir, _ = trained
    ours = run_test(cfg, run_dir / "checkpoints" / "last.pt", quiet=True)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    model = build_model(cfg, state["num_classes"], state["num_cameras"])
    model.load_state_dict(state["model"])
    official = to_official_state_dict(model)
    assert any(k.startswith("BACKBONE.base.") for k in official)
    torch.save(official, tmp_path / "EDITORbest.pth")
    torch.save({f"module.{k}": v for k, v in official.items()}, tmp_path / "ddp.pth")
    assert run_test(cfg, tmp_path / "EDITORbest.pth", quiet=True) == pytest.approx(ours)
    assert run_test(cfg, tmp_path / "ddp.pth", quiet=True) == pytest.approx(ours)


def test_plain_state_dict_and_bad_files(trained, tmp_path):
    cfg, run_dir, _ = trained
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    torch.save(state["model"], tmp_path / "plain.pt")
    assert run_test(cfg, tmp_path / "plain.pt", quiet=True) == pytest.approx(
        run_test(cfg, run_dir / "checkpoints" / "last.pt", quiet=True))
    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(RuntimeError, match="foreign.pt"):
        run_test(cfg, tmp_path / "foreign.pt", quiet=True)
    with pytest.raises(FileNotFoundError):
        run_test(cfg, tmp_path / "absent.pt", quiet=True)
    small = load_config(None, overrides=[*TINY, "model.depth=1", f"datasets.root_dir={cfg.datasets.root_dir}"])
    with pytest.raises(RuntimeError, match="config.yaml"):
        run_test(small, run_dir / "checkpoints" / "last.pt", quiet=True)


def test_rerank_changes_the_distances_but_stays_valid(trained):
    cfg, run_dir, _ = trained
    plain = run_test(cfg, run_dir / "checkpoints" / "last.pt", quiet=True)
    reranked = run_test(cfg, run_dir / "checkpoints" / "last.pt", rerank=True, quiet=True)
    assert set(reranked) == METRICS and all(0.0 <= v <= 1.0 for v in reranked.values())
    assert reranked != plain


def test_extract_features_zeroes_missing_modalities(trained):
    cfg, run_dir, _ = trained
    splits = load_dataset(cfg.datasets.names, cfg.datasets.root_dir)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    model = build_model(cfg, state["num_classes"], state["num_cameras"])
    load_weights(model, run_dir / "checkpoints" / "last.pt")
    model.train()
    loader = build_test_loader(cfg, splits.query[:10])
    feats, pids, camids, sceneids = extract_features(model, loader, "cpu", modalities=("RGB",))
    assert model.training  # mode restored
    assert feats.shape == (10, 3 * 64) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert pids.tolist() == [s.pid for s in splits.query[:10]]
    assert camids.tolist() == [s.camid for s in splits.query[:10]]
    assert len(sceneids) == 10
    model.eval()
    batch = next(iter(loader))
    with torch.no_grad():
        expected = model({"RGB": batch["RGB"], "NI": torch.zeros_like(batch["NI"]),
                          "TI": torch.zeros_like(batch["TI"])}, batch["camid"])
    assert torch.allclose(feats, expected, atol=1e-5)
    metrics = evaluate_model(cfg, model, splits, "cpu")
    assert metrics == pytest.approx(run_test(cfg, run_dir / "checkpoints" / "last.pt", quiet=True))


def test_modality_subsets_order():
    assert [("+".join(s)) for s in modality_subsets()] == ["RGB", "NI", "TI", "RGB+NI", "RGB+TI", "NI+TI", "RGB+NI+TI"]
    assert len(modality_subsets(("RGB", "TI"))) == 3


def test_test_needs_only_the_evaluation_split(trained, tmp_path):
    import shutil

    cfg, run_dir, _ = trained
    root = tmp_path / "test_only"
    shutil.copytree(cfg.datasets.root_dir, root)
    shutil.rmtree(root / "RGBNT201" / "train_171")
    only = load_config(None, overrides=[*TINY, f"datasets.root_dir={root}"])
    expected = run_test(cfg, run_dir / "checkpoints" / "last.pt", quiet=True)
    assert run_test(only, run_dir / "checkpoints" / "last.pt", quiet=True) == pytest.approx(expected)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    torch.save(state["model"], tmp_path / "plain.pt")  # sizes read from the state dict's shapes
    assert run_test(only, tmp_path / "plain.pt", quiet=True) == pytest.approx(expected)


def test_checkpoint_with_too_few_cameras_for_the_data_is_a_clear_error(trained, tmp_path):
    from editor_reid.engine.checkpoint import CheckpointError, save_checkpoint

    cfg, run_dir, _ = trained
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    state["model"]["backbone.sie_embed"] = state["model"]["backbone.sie_embed"][:2]  # trained on 2 cameras
    state["num_cameras"] = 2
    save_checkpoint(tmp_path / "two_cameras.pt", state)
    with pytest.raises(CheckpointError, match=r"trained with 2 cameras .* camera id 3"):
        run_test(cfg, tmp_path / "two_cameras.pt", quiet=True)


def test_a_missing_modality_twin_is_found_before_evaluation(trained, tmp_path):
    import shutil

    from editor_reid.data.validate import PreflightError

    cfg, run_dir, _ = trained
    root = tmp_path / "twinless"
    shutil.copytree(cfg.datasets.root_dir, root)
    victim = sorted((root / "RGBNT201" / "test" / "TI").iterdir())[0]
    victim.unlink()
    broken = load_config(None, overrides=[*TINY, f"datasets.root_dir={root}"])
    with pytest.raises(PreflightError, match=victim.name):
        run_test(broken, run_dir / "checkpoints" / "last.pt", quiet=True)
