"""``editor-reid demo``: synthetic data -> a tiny EDITOR trained on CPU -> before/after metrics
-> a picture of the selected tokens, with how many of them land on the object.

Everything is seeded and runs deterministically on the CPU, so the same seed prints the same
numbers on the same machine.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

import editor_reid
from editor_reid.config import Config, ConfigError, load_config, validate_config
from editor_reid.data.layouts import load_dataset
from editor_reid.data.loaders import build_test_loader, seed_everything
from editor_reid.data.synthetic import load_mask, make_synthetic
from editor_reid.engine.evaluate import load_weights
from editor_reid.engine.logging_utils import ensure_console_log
from editor_reid.engine.tables import format_metrics_table
from editor_reid.engine.train import train
from editor_reid.engine.visualize import (
    OBJECT_PATCH_THRESHOLD,
    mask_at_size,
    patch_object_fraction,
    render_token_selection,
    tensor_to_image,
    token_object_overlap,
)
from editor_reid.model import build_model

__all__ = ["run_demo", "demo_config", "DEMO_IDS", "DEMO_PRESET"]

log = logging.getLogger(__name__)

DEMO_PRESET = Path(editor_reid.__file__).resolve().parent / "presets" / "demo.yaml"
DEMO_IDS = 60  # identities in the synthetic dataset (half train, half test)
DEMO_VIEWS = 3  # images per identity and camera
PICTURE_SAMPLES = 4


def demo_config(out: Path, seed: int, epochs: int | None = None, overrides: list[str] | None = None) -> Config:
    cfg = load_config(DEMO_PRESET, overrides=overrides)
    cfg.datasets.root_dir = str(out / "data")
    cfg.output_dir = str(out / "run")
    cfg.solver.seed = seed
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"demo --epochs must be >= 1, got {epochs}")
        cfg.solver.max_epochs = epochs
        cfg.solver.eval_period = min(cfg.solver.eval_period, epochs) or epochs
    validate_config(cfg)  # the seed was set by hand, after loading checked the rest
    return cfg


def _clear_previous_run(run_dir: Path) -> None:
    """The demo owns ``OUT/run``: a previous demo run there is replaced."""
    if not run_dir.exists():
        return
    if not (run_dir / "config.yaml").is_file() and any(run_dir.iterdir()):
        raise FileExistsError(f"'{run_dir}' exists and is not a run directory; choose another --out")
    shutil.rmtree(run_dir)


@torch.no_grad()
def token_selection_report(cfg: Config, model, splits, out_png: Path, seed: int) -> dict:
    """Token masks over the test images: picture of a few samples + object-overlap statistics."""
    model.eval()
    grid = tuple(model.grid_size)
    size = tuple(cfg.input.size_test)  # H, W
    samples = list(splits.query)
    loader = build_test_loader(cfg, samples)
    masks: list[np.ndarray] = []
    picture: list[dict] = []
    titles: list[str] = []
    seen_pids: set[int] = set()
    offset = 0
    for batch in loader:
        images = {m: batch[m] for m in cfg.datasets.modalities}
        out = model.forward_features(images, batch["camid"])
        token_mask = out.token_mask.cpu().numpy().astype(bool)  # [B, N]
        masks.append(token_mask)
        for i in range(token_mask.shape[0]):
            pid = int(batch["pid"][i])
            if len(picture) < PICTURE_SAMPLES and pid not in seen_pids:
                seen_pids.add(pid)
                picture.append({m: tensor_to_image(batch[m][i], cfg.input.pixel_mean, cfg.input.pixel_std)
                                for m in cfg.datasets.modalities})
                titles.append(f"ID {pid}\ncam {int(batch['camid'][i]) + 1}\n{int(token_mask[i].sum())}/"
                              f"{token_mask.shape[1]}\ntokens")
                picture[-1]["_index"] = offset + i
        offset += token_mask.shape[0]
    selected = np.concatenate(masks)
    on_object = np.stack([
        patch_object_fraction(mask_at_size(load_mask(s, "RGB"), size), grid) >= OBJECT_PATCH_THRESHOLD
        for s in samples
    ])
    stats = token_object_overlap(selected, on_object, seed)
    indices = [p.pop("_index") for p in picture]
    render_token_selection(picture, [selected[i] for i in indices], grid, out_png, titles=titles)
    return stats


def run_demo(out: str | Path, seed: int = 1111, json_out: str | Path | None = None, epochs: int | None = None, *,
             ids: int = DEMO_IDS, views: int = DEMO_VIEWS, overrides: list[str] | None = None,
             quiet: bool = False) -> dict:
    """Run the whole demo under ``out`` (data in ``out/data``, the run in ``out/run``).

    ``epochs``, ``ids``, ``views`` and config ``overrides`` shrink it (tests use them).
    Returns ``{"untrained": metrics, "trained": metrics, "run_dir": str, "token_selection":
    {...}, "epochs", "seed"}`` with metrics as fractions; ``json_out`` writes the same dict.
    """
    ensure_console_log()
    threads = torch.get_num_threads()
    # One thread: multi-threaded CPU kernels gave run-to-run differences in the last digits
    # on a loaded machine, which training amplifies; a single thread is exactly repeatable.
    torch.set_num_threads(1)
    try:
        return _run_demo(Path(out), seed, json_out, epochs, ids, views, overrides, quiet)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, seed: int, json_out, epochs, ids: int, views: int, overrides, quiet: bool) -> dict:
    started = time.perf_counter()
    cfg = demo_config(out, seed, epochs, overrides)
    run_dir = Path(cfg.output_dir)
    _clear_previous_run(run_dir)

    log.info("demo: writing a synthetic RGBNT201-layout dataset (%d identities) to %s", ids, out / "data")
    make_synthetic("rgbnt201", out / "data", ids=ids, views=views, seed=seed)
    data_seconds = time.perf_counter() - started

    summary = train(cfg, evaluate_untrained=True, device="cpu", quiet=True)
    untrained = summary["untrained"]["metrics"]
    trained = summary["final"]["metrics"]

    splits = load_dataset(cfg.datasets.names, cfg.datasets.root_dir)
    seed_everything(seed)
    model = build_model(cfg, splits.num_train_pids, splits.num_cameras)
    load_weights(model, run_dir / "checkpoints" / "last.pt")
    png = out / "token_selection.png"
    tokens = token_selection_report(cfg, model, splits, png, seed)
    seconds = time.perf_counter() - started

    result = {
        "untrained": untrained,
        "trained": trained,
        "run_dir": str(run_dir),
        "token_selection": {
            "selected_on_object": tokens["selected_on_object"],
            "random_on_object": tokens["random_on_object"],
            "selected_per_image": tokens["selected_per_image"],
            "patches_per_image": tokens["patches_per_image"],
            "images": tokens["images"],
            "object_patch_threshold": OBJECT_PATCH_THRESHOLD,
            "picture": str(png),
        },
        "epochs": summary["final"]["epoch"],
        "seed": seed,
    }
    if not quiet:
        print(f"demo: synthetic RGBNT201 layout, {len(splits.train)} train / {len(splits.query)} test samples, "
              f"{splits.num_train_pids} train IDs; tiny EDITOR "
              f"(ViT dim {cfg.model.embed_dim}, depth {cfg.model.depth}, {cfg.input.size_train[0]}x"
              f"{cfg.input.size_train[1]}) trained {result['epochs']} epochs on CPU (1 thread), seed {seed}")
        print(format_metrics_table({"untrained": untrained, "trained": trained}))
        t = result["token_selection"]
        print(f"token selection: {t['selected_per_image']:.1f} of {t['patches_per_image']} tokens kept per image; "
              f"{100 * t['selected_on_object']:.1f}% of the selected tokens lie on the object vs "
              f"{100 * t['random_on_object']:.1f}% of as many random tokens (a patch is object when >= "
              f"{int(100 * OBJECT_PATCH_THRESHOLD)}% of its pixels are; {t['images']} test images)")
        print(f"picture of the selected tokens: {png}")
        print(f"run directory: {run_dir} (config.yaml, metrics.jsonl, checkpoints/); "
              f"{seconds:.0f} s in all ({data_seconds:.0f} s making data)")
    if json_out is not None:
        path = Path(json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return result
