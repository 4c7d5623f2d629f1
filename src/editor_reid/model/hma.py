"""HMA: Hierarchical Masked Aggregation (docs/official-behaviour.md#hma).

Official semantics: each modality's SFTS-masked backbone tokens go through its own pre-LN masked
transformer block, then the three sequences are concatenated and go through one shared masked
block, a LayerNorm ``out_norm`` and re-masking. Per modality, the CLS output and the mean of the
selected patch outputs (divided by |M_U|, docs/official-behaviour.md#quirk-patch-mean-divisor) are concatenated (2D)
and reduced to D by a per-modality Linear (``reduce``); the three results concatenated are f_HMA [B, 3D], the
retrieval feature. The stage-1 CLS outputs feed OCFR.

In the official masked computation a dropped token is exactly zero at every step (inputs are
masked before every Linear, no Linear has a bias, GELU(0) = 0, the row mask zeroes dropped
queries) and kept tokens attend only to kept tokens. Dropped tokens therefore influence nothing,
so this implementation gathers the kept tokens (CLS + selected patches, in token order) into a
compact sequence padded to the largest count in the batch, and runs scaled-dot-product attention
with a key-padding mask. The row-wise work (LayerNorms, projections, MLP) runs on the valid rows
only, packed without padding; only attention sees the padded layout. The stage-2 block runs over
the concatenated kept tokens of the three modalities. The result equals the direct masked
computation up to float summation order (tests/test_hma.py and tests/test_parity.py compare).
The kept-token counts are read on the host once per forward (data-dependent shapes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import nn

from editor_reid.model._mlp import gelu_mlp

__all__ = ["HMA", "HMAOutput", "MaskedAttention", "MaskedBlock", "MaskedMlp", "gather_kept_tokens"]


def gather_kept_tokens(
    tokens: torch.Tensor, mask: torch.Tensor, length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact the kept tokens: tokens [B, 1+N, D], mask [B, N] -> ([B, Lc, D], valid [B, Lc]).

    CLS stays at index 0, selected patches follow in token order, padding positions are zero and
    ``valid`` is False there. Lc = 1 + max_b |M_U(b)|; pass it as ``length`` when known (saves a
    host sync).
    """
    keep = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)  # [B, 1+N]
    counts = keep.sum(dim=1)
    if length is None:
        length = int(counts.max())
    if length == keep.shape[1]:
        return tokens * keep.unsqueeze(-1).to(tokens.dtype), keep
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :length]  # kept positions first
    valid = torch.arange(length, device=mask.device).unsqueeze(0) < counts.unsqueeze(1)
    compact = tokens.gather(1, order.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return compact * valid.unsqueeze(-1).to(tokens.dtype), valid


class MaskedAttention(nn.Module):
    """Multi-head self-attention without biases over the valid tokens only."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"HMA width {dim} is not divisible by its {num_heads} heads (model.hma_heads)")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor, all_valid: bool = False) -> torch.Tensor:
        """x [B, L, D] (zero at invalid positions), valid [B, L] bool -> [B, L, D].

        Valid queries attend to valid keys only; invalid queries give exactly zero (row mask).
        """
        return self.proj(self.attend(self.qkv(x), valid, all_valid))

    def attend(
        self, qkv: torch.Tensor, valid: torch.Tensor, all_valid: bool = False, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention from projected q/k/v, before ``proj``.

        Padded layout: qkv [B, L, 3D] -> [B, L, D], zero at invalid positions. Packed layout
        (``rows`` = flat indices of the valid positions of [B, L], qkv [T, 3D] for those rows)
        -> [T, D].
        """
        batch, length = valid.shape
        if rows is not None:  # scatter the packed rows into the padded layout attention needs
            qkv = qkv.new_zeros(batch * length, qkv.shape[-1]).index_copy_(0, rows, qkv).reshape(batch, length, -1)
        q, k, v = qkv.reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if all_valid:
            out = F.scaled_dot_product_attention(q, k, v)  # [B, h, L, d]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        out = out.transpose(1, 2).reshape(batch * length, -1)  # [B·L, D]
        if rows is not None:
            return out[rows]
        if not all_valid:
            out = out * valid.reshape(-1, 1).to(out.dtype)
        return out.reshape(batch, length, -1)


class MaskedMlp(nn.Module):
    """fc1 -> GELU -> fc2, no biases (GELU(0) = 0 keeps dropped tokens at zero)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        #: With gradients, keep fc1's output but not GELU's for the backward pass
        #: (``model.lean_mlp``; :func:`editor_reid.model._mlp.gelu_mlp`): same output and gradients.
        self.lean = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lean and torch.is_grad_enabled():
            return gelu_mlp(x, self.fc1.weight, None, self.fc2.weight, None)
        return self.fc2(self.act(self.fc1(x)))


class MaskedBlock(nn.Module):
    """Pre-LN block: x += Attn(LN(x)·m, m); x += MLP(LN(x)·m). LayerNorm eps 1e-5 (PyTorch default).

    With padding, the row-wise parts (norms, projections, MLP) run on the valid rows only, packed;
    only attention sees the padded layout. Invalid positions of the output are exactly zero.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MaskedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MaskedMlp(dim, int(dim * mlp_ratio))

    def forward(
        self, x: torch.Tensor, valid: torch.Tensor, all_valid: bool = False, rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x [B, L, D], valid [B, L] bool -> [B, L, D]. ``rows``: flat indices of the valid
        positions (computed when not given); ignored when ``all_valid``."""
        if all_valid:
            x = x + self.attn(self.norm1(x), valid, all_valid=True)
            return x + self.mlp(self.norm2(x))
        if rows is None:
            rows = valid.flatten().nonzero().squeeze(1)
        batch, length, dim = x.shape
        packed = x.reshape(-1, dim)[rows]  # [T, D]
        packed = packed + self.attn.proj(self.attn.attend(self.attn.qkv(self.norm1(packed)), valid, rows=rows))
        packed = packed + self.mlp(self.norm2(packed))
        return packed.new_zeros(batch * length, dim).index_copy_(0, rows, packed).reshape(batch, length, dim)


@dataclass
class HMAOutput:
    feature: torch.Tensor  # [B, M·D] f_HMA (pre-BN retrieval feature)
    cls: dict[str, torch.Tensor]  # stage-1 CLS per modality, [B, D] (OCFR input)


class HMA(nn.Module):
    """Stage 1 (one masked block per modality) -> stage 2 (shared block) -> out_norm -> reduce.

    ``forward(tokens, mask)``: tokens per modality (same order as ``modalities``), each the
    backbone output [B, 1+N, D] (masking happens here), mask = M_U [B, N] bool.
    """

    def __init__(self, dim: int, num_heads: int, modalities: Sequence[str] = ("RGB", "NI", "TI"), mlp_ratio: float = 4.0):
        super().__init__()
        self.modalities = tuple(modalities)
        self.modal_blocks = nn.ModuleDict({m: MaskedBlock(dim, num_heads, mlp_ratio) for m in self.modalities})
        self.fusion_block = MaskedBlock(dim, num_heads, mlp_ratio)
        self.out_norm = nn.LayerNorm(dim)
        self.reduce = nn.ModuleDict({m: nn.Linear(2 * dim, dim) for m in self.modalities})
        #: Recompute the masked blocks in the backward pass instead of keeping their activations.
        self.grad_checkpointing = False
        self._init_weights()

    def _block(self, block: nn.Module, *args) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for linear in self.reduce.values():  # official weights_init_kaiming
            nn.init.kaiming_normal_(linear.weight, a=0, mode="fan_out")
            nn.init.zeros_(linear.bias)

    def forward(self, tokens: Sequence[torch.Tensor], mask: torch.Tensor) -> HMAOutput:
        if len(tokens) != len(self.modalities):
            expected = f"{len(self.modalities)} token sets ({', '.join(self.modalities)})"
            raise ValueError(f"HMA expects {expected}, got {len(tokens)}")
        keep_counts = mask.sum(dim=1) + 1  # CLS + selected patches per sample
        length, total = torch.stack([keep_counts.max(), keep_counts.sum()]).tolist()  # the one host sync
        all_valid = length == mask.shape[1] + 1 and total == length * mask.shape[0]
        compact, valid = [], None
        for x in tokens:
            c, valid = gather_kept_tokens(x, mask, length)
            compact.append(c)
        num_mod = len(self.modalities)
        rows = joint_rows = None
        if not all_valid:
            rows = torch.nonzero_static(valid.flatten(), size=total).squeeze(1)  # valid positions of [B, Lc]
            sample, slot = rows // length, rows % length
            # The same positions in the concatenated [B, M·Lc] sequences, modality by modality.
            joint_rows = torch.cat([sample * num_mod * length + m * length + slot for m in range(num_mod)])
        stage1 = [self._block(self.modal_blocks[m], x, valid, all_valid, rows) for m, x in zip(self.modalities, compact)]
        cls = {m: x[:, 0] for m, x in zip(self.modalities, stage1)}
        joint_valid = valid.repeat(1, num_mod)
        joint = self._block(self.fusion_block, torch.cat(stage1, dim=1), joint_valid, all_valid, joint_rows)
        joint = self.out_norm(joint) * joint_valid.unsqueeze(-1).to(joint.dtype)
        count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(joint.dtype)  # |M_U|
        features = []
        for index, m in enumerate(self.modalities):
            part = joint[:, index * length : (index + 1) * length]
            pooled = torch.cat([part[:, 0], part[:, 1:].sum(dim=1) / count], dim=-1)  # [B, 2D]
            features.append(self.reduce[m](pooled))
        return HMAOutput(feature=torch.cat(features, dim=-1), cls=cls)
