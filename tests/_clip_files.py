"""CLIP weight files in their real formats, for the loader tests: OpenAI's key layout
(:func:`openai_clip_state`) and its TorchScript container (:func:`write_torchscript_archive`,
``torch.jit.save`` of a scripted module tree, as ``ViT-B-16.pt`` is)."""

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


_BLOCK_NAMES = {"ln_1": "norm1", "ln_2": "norm2", "attn.in_proj": "attn.qkv", "attn.out_proj": "attn.proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def openai_clip_state(vit: nn.Module, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """The key layout of OpenAI's CLIP state dict written from a timm CLIP ViT: ``visual.*`` plus
    text-tower and metadata keys, in ``dtype`` (fp16, as the released ViT-B-16.pt)."""
    sd = {k: v.detach() for k, v in vit.state_dict().items()}
    out = {
        "visual.class_embedding": sd["cls_token"][0, 0],
        "visual.positional_embedding": sd["pos_embed"][0],
        "visual.conv1.weight": sd["patch_embed.proj.weight"],
        "visual.ln_pre.weight": sd["norm_pre.weight"],
        "visual.ln_pre.bias": sd["norm_pre.bias"],
        "visual.ln_post.weight": sd["norm.weight"],
        "visual.ln_post.bias": sd["norm.bias"],
        "visual.proj": torch.randn(vit.embed_dim, 32),
        "positional_embedding": torch.randn(77, 32),
        "text_projection": torch.randn(32, 32),
        "token_embedding.weight": torch.randn(100, 32),
        "ln_final.weight": torch.ones(32),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(len(vit.blocks)):
        for clip_name, timm_name in _BLOCK_NAMES.items():
            for leaf in ("weight", "bias"):
                clip_leaf = f"{clip_name}_{leaf}" if clip_name == "attn.in_proj" else f"{clip_name}.{leaf}"
                out[f"visual.transformer.resblocks.{i}.{clip_leaf}"] = sd[f"blocks.{i}.{timm_name}.{leaf}"]
    out = {k: v.to(dtype).clone() for k, v in out.items()}
    out["input_resolution"] = torch.tensor(224)  # top-level integer tensors, as in ViT-B-16.pt
    out["context_length"] = torch.tensor(77)
    return out
