"""A tiny checkpoint on a small synthetic RGBNT201 tree, shared by the feature tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from _tiny import TRAIN
from editor_reid.config import config_to_dict, load_config
from editor_reid.data.synthetic import make_synthetic
from editor_reid.engine.checkpoint import save_checkpoint, weights_payload
from editor_reid.model import build_model
from editor_reid.modalities import MODALITIES

NUM_CLASSES = 4
NUM_CAMERAS = 4  # RGBNT201's cameras


def tiny_weights(tmp: Path, *extra: str, seed: int = 0) -> tuple[Path, Path]:
    """(data root, checkpoint): 8 identities × 2 views of synthetic RGBNT201, and an untrained
    tiny EDITOR (seeded init; random SIE table) saved as an editor-reid weights file."""
    data = tmp / "data"
    if not data.exists():
        make_synthetic("rgbnt201", data, ids=8, views=2, seed=0)
    cfg = load_config(None, [*TRAIN, f"datasets.root_dir={data}", "test.ims_per_batch=4", *extra])
    torch.manual_seed(seed)
    model = build_model(cfg, NUM_CLASSES, NUM_CAMERAS)
    weights = save_checkpoint(tmp / "weights.pt", weights_payload(
        model.state_dict(), {}, config=config_to_dict(cfg), epoch=1, metrics=None, num_classes=NUM_CLASSES,
        num_cameras=NUM_CAMERAS))
    return data, weights


def extract_on_one_thread(weights: Path, out: Path, data: Path, **kwargs) -> Path:
    """``run_extract`` of the synthetic RGBNT201 query and gallery splits on one thread, as each
    torchrun rank computes them (so files of one and of two processes compare bit for bit)."""
    from editor_reid.features.extract import run_extract

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_extract(weights, out, dataset="rgbnt201", root=data, **kwargs)
    finally:
        torch.set_num_threads(threads)


def rgbnt201_test_samples(data: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """The synthetic RGBNT201 test split as (samples: modality -> image path, pids, camids)."""

    rgb = sorted((data / "RGBNT201" / "test" / "RGB").glob("*.jpg"))
    samples = [{m: str(path.parent.parent / m / path.name) for m in MODALITIES} for path in rgb]
    pids = np.array([int(path.name.split("_")[0]) for path in rgb])
    camids = np.array([int(path.name.split("_")[1][3:]) - 1 for path in rgb])
    return samples, pids, camids
