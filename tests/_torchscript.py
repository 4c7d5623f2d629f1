"""Write a TorchScript archive (``torch.jit.save``) in the container format of OpenAI's
``ViT-B-16.pt``: a scripted module tree holding the given tensors under their dotted names."""

from __future__ import annotations

import warnings

import torch
from torch import nn


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_torchscript_archive(state: dict[str, torch.Tensor], path) -> None:
    """Save ``state`` as the parameters of a scripted module tree at ``path``."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        node = root
        for part in parents:
            if not hasattr(node, part):
                node.add_module(part, _Holder())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.script(root).save(str(path))
