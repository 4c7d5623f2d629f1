"""The tiny EDITOR configurations the tests share: a model (width 64, depth 2, 4 heads) and a
deterministic training run on it (CPU, deterministic kernels, seeded data order and augmentation)."""

import torch

from editor_reid.config import load_config
from editor_reid.engine.checkpoint import load_checkpoint


def tiny_cfg(size=(64, 32), **overrides):
    items = [
        "model.embed_dim=64",
        "model.depth=2",
        "model.num_heads=4",
        f"input.size_train=[{size[0]},{size[1]}]",
        f"input.size_test=[{size[0]},{size[1]}]",
        "model.head_keep=1",
        "model.frequency_keep=2",
    ]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return load_config(None, items)


#: A tiny, deterministic training run (2 heads, 64x32 input, P×K 4×2); modules add their own
#: epoch, step and checkpoint settings.
TRAIN = [
    "model.pretrain_choice=none", "model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.drop_path=0.1",
    "model.head_keep=1", "model.frequency_keep=2", "input.size_train=[64,32]", "input.size_test=[64,32]",
    "dataloader.num_workers=0", "dataloader.num_instance=2", "solver.ims_per_batch=8", "solver.warmup_iters=1",
    "solver.optimizer_name=SGD", "solver.base_lr=0.01", "solver.deterministic=true", "solver.log_period=1",
    "test.ims_per_batch=64",
]


def train_cfg(data_root, out, *extra):
    """A TRAIN config on ``data_root`` writing to ``out``, with ``extra`` overrides."""
    return load_config(None, overrides=[*TRAIN, f"datasets.root_dir={data_root}", f"output_dir={out}", *extra])


def assert_same_run(a_dir, b_dir) -> None:
    """Two run directories end in exactly the same training state (weights, OCFR centres,
    optimiser state, counters, evaluation history)."""
    a = load_checkpoint(a_dir / "checkpoints" / "last.pt")
    b = load_checkpoint(b_dir / "checkpoints" / "last.pt")
    for part in ("model", "criterion"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key]))
    for key in ("epoch", "global_step", "history"):
        assert a["progress"][key] == b["progress"][key], key
