"""The tiny EDITOR configuration the model tests share (width 64, depth 2, 4 heads)."""

from editor_reid.config import load_config


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
