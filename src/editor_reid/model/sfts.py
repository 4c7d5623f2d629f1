"""SFTS: Spatial-Frequency Token Selection (docs/official-behaviour.md#sfts).

One boolean mask ``M_U`` [B, N] over the patch tokens, shared by all modalities; the CLS token
is always kept. Selection has no parameters and no gradient (indices from ``torch.topk``).

* Spatial (docs/official-behaviour.md#sfts-spatial): per modality and per head, the CLS row (without the CLS column)
of the
  attention product ``A_L ··· A_1`` (no residual, no renormalisation); top ``head_keep`` patches
  per head; union over heads and over modalities.
* Frequency, ``mode="official"`` (docs/official-behaviour.md#sfts-frequency): 4-level 2-D Haar DWT (mode 'zero') of
each normalised
  input, mean of every band across modalities, inverse DWT, mean over colour channels, score of a
  16x16 patch = number of pixels > 0, top ``frequency_keep``. The DWT is linear and invertible,
  so this equals the same count on the pixel-wise modality mean (``shortcut=True``); both paths
  are kept, the literal one is the default.
* Frequency, ``mode="highpass"`` (what the paper's text describes): score of patch p =
  ``Σ_{j=1..J} Σ_{c} Σ_{o∈{LH,HL,HH}} Σ_{(u,v)∈p_j} Ȳ_j[c,o,u,v]²`` where ``Ȳ_j`` are the level-j
  detail coefficients averaged across modalities and ``p_j`` the (16/2^j)² level-j coefficients
  that cover patch p; i.e. the high-frequency energy of the modality-averaged image inside the
  patch. Top ``frequency_keep``.
* ``M_U = M_S ∨ M_F``; unselected patch tokens are zeroed in every modality.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "SFTS",
    "apply_token_mask",
    "frequency_mask",
    "frequency_scores",
    "haar_dwt2",
    "haar_idwt2",
    "select_tokens",
    "spatial_mask",
    "topk_mask",
    "TIE_RULES",
]

FREQUENCY_MODES = ("official", "highpass")


def _haar_filters(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The four 2x2 orthonormal Haar analysis filters [LL, LH, HL, HH], shape [4, 2, 2].

    Sub-band order and signs follow PyWavelets' ``dwt2`` (cA, cH, cV, cD).
    """
    filters = torch.tensor(
        [
            [[1.0, 1.0], [1.0, 1.0]],  # approximation
            [[1.0, 1.0], [-1.0, -1.0]],  # horizontal detail (LH): low along width, high along height
            [[1.0, -1.0], [1.0, -1.0]],  # vertical detail (HL)
            [[1.0, -1.0], [-1.0, 1.0]],  # diagonal detail (HH)
        ],
        device=device,
        dtype=dtype,
    )
    return filters / 2.0


def haar_dwt2(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Multi-level 2-D Haar DWT with zero extension (PyWavelets ``wavedec2(x, 'haar', 'zero')``).

    x: [..., H, W]. Returns ``(low, highs)`` with ``low`` [..., H/2^J, W/2^J] and ``highs[j-1]``
    [..., 3, H/2^j, W/2^j] holding (LH, HL, HH) of level j (finest first). Odd sizes are padded
    with one zero row/column at the end, as PyWavelets does.
    """
    lead = x.shape[:-2]
    filters = _haar_filters(x.device, x.dtype)
    current = x.reshape(-1, *x.shape[-2:])
    highs = []
    for _ in range(levels):
        height, width = current.shape[-2:]
        current = nn.functional.pad(current, (0, width % 2, 0, height % 2))
        h, w = current.shape[-2] // 2, current.shape[-1] // 2
        # Stride-2 correlation with the 2x2 filters, written on the non-overlapping 2x2 blocks.
        bands = torch.einsum("mhiwj,fij->mfhw", current.reshape(-1, h, 2, w, 2), filters)  # [M, 4, h, w]
        highs.append(bands[:, 1:].reshape(*lead, 3, h, w))
        current = bands[:, 0]
    return current.reshape(*lead, *current.shape[-2:]), highs


def haar_idwt2(low: torch.Tensor, highs: Sequence[torch.Tensor], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`haar_dwt2` (PyWavelets ``waverec2``); ``size`` crops the final output."""
    lead = low.shape[:-2]
    filters = _haar_filters(low.device, low.dtype)
    current = low.reshape(-1, *low.shape[-2:])
    for level in range(len(highs) - 1, -1, -1):
        high = highs[level].reshape(-1, 3, *highs[level].shape[-2:])
        h, w = high.shape[-2:]
        current = current[..., :h, :w]  # drop the padding row/column of the coarser level
        bands = torch.cat([current.unsqueeze(1), high], dim=1)  # [M, 4, h, w]
        # Orthonormal filters: synthesis is the transpose of analysis (a stride-2 transposed conv).
        current = torch.einsum("mfhw,fij->mhiwj", bands, filters).reshape(-1, 2 * h, 2 * w)
    if size is not None:
        current = current[..., : size[0], : size[1]]
    return current.reshape(*lead, *current.shape[-2:])


def _patch_sum(values: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, H, W] -> [B, N]: sum over non-overlapping patch x patch windows, row-major (ViT order)."""
    batch, height, width = values.shape
    windows = values.reshape(batch, height // patch, patch, width // patch, patch)
    return windows.sum(dim=(2, 4)).reshape(batch, -1)


def frequency_scores(
    images: Sequence[torch.Tensor],
    patch_size: int = 16,
    *,
    mode: str = "official",
    levels: int = 4,
    shortcut: bool = False,
) -> torch.Tensor:
    """Per-patch frequency score [B, N] from the normalised modality images (each [B, 3, H, W]).

    ``official``: count of pixels > 0 in the IDWT of the modality-averaged DWT, averaged over
    colour channels (``shortcut=True`` uses the pixel mean directly, which is equal).
    ``highpass``: detail-band energy of the modality-averaged DWT pooled onto the patch grid
    (formula in the module docstring); needs ``patch_size == 2**levels``.
    """
    if mode not in FREQUENCY_MODES:
        raise ValueError(f"model.frequency_mode '{mode}' is not one of {', '.join(FREQUENCY_MODES)}")
    height, width = images[0].shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not a multiple of the patch size {patch_size}")
    with torch.autocast(device_type=images[0].device.type, enabled=False):
        stack = torch.stack([img.float() for img in images])  # [M, B, 3, H, W]
        if mode == "official":
            if shortcut:
                image = stack.mean(dim=0)
            else:
                low, highs = haar_dwt2(stack, levels)
                image = haar_idwt2(low.mean(dim=0), [h.mean(dim=0) for h in highs], size=(height, width))
            return _patch_sum((image.mean(dim=1) > 0).float(), patch_size)
        if 2**levels != patch_size:
            raise ValueError(f"highpass frequency scores need patch_size == 2**levels, got {patch_size} and {levels}")
        _, highs = haar_dwt2(stack.mean(dim=0), levels)  # DWT is linear: mean of DWTs = DWT of mean
        score = 0.0
        for level, high in enumerate(highs, start=1):
            energy = high.pow(2).sum(dim=(1, 2))  # [B, H/2^j, W/2^j], summed over colour and band
            score = score + _patch_sum(energy, patch_size // 2**level)
        return score


#: How equal scores at the top-k cut-off are broken (``model.sfts_ties``): "torch" as
#: ``torch.topk`` breaks them (the official code's choice; implementation-defined, it differs
#: between CPU and CUDA), "lower_index" keeps the lower patch index (deterministic on every
#: device, and what ONNX's TopK does, so an exported model matches on every input).
TIE_RULES = ("torch", "lower_index")


def topk_mask(scores: torch.Tensor, k: int, ties: str = "torch") -> torch.Tensor:
    """Boolean mask (same shape as scores [..., N]) of the top-k entries along the last axis;
    ``ties`` (:data:`TIE_RULES`) says which of equal scores at the cut-off are kept."""
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    k = min(int(k), scores.shape[-1])
    if k <= 0:
        return mask
    if ties == "lower_index" and not torch.compiler.is_exporting():
        # A stable descending sort keeps equal scores in index order. An exported graph uses
        # TopK below instead, whose ONNX definition breaks ties the same way.
        indices = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    else:
        indices = torch.topk(scores, k, dim=-1).indices
    return mask.scatter_(-1, indices, True)


def spatial_mask(rollouts: Sequence[torch.Tensor], head_keep: int, ties: str = "torch") -> torch.Tensor:
    """Union over modalities and heads of the per-head top-``head_keep`` patches.

    rollouts: per modality the CLS row of the attention product, [B, h, N]. Returns [B, N] bool.
    """
    per_head = topk_mask(torch.stack(list(rollouts)), head_keep, ties)  # [M, B, h, N]
    return per_head.any(dim=2).any(dim=0)


def frequency_mask(
    images: Sequence[torch.Tensor], frequency_keep: int, patch_size: int = 16, *, mode: str = "official",
    ties: str = "torch",
) -> torch.Tensor:
    """Top ``frequency_keep`` patches by :func:`frequency_scores`: [B, N] bool."""
    return topk_mask(frequency_scores(images, patch_size, mode=mode), frequency_keep, ties)


def select_tokens(
    rollouts: Sequence[torch.Tensor],
    images: Sequence[torch.Tensor],
    *,
    head_keep: int = 2,
    frequency_keep: int = 10,
    frequency_mode: str = "official",
    patch_size: int = 16,
    ties: str = "torch",
) -> torch.Tensor:
    """M_U = spatial ∨ frequency mask, [B, N] bool (no gradient)."""
    with torch.no_grad():
        spatial = spatial_mask(rollouts, head_keep, ties)
        frequency = frequency_mask(images, frequency_keep, patch_size, mode=frequency_mode, ties=ties)
        if spatial.shape != frequency.shape:
            raise ValueError(f"token grid {tuple(spatial.shape)} and patch grid {tuple(frequency.shape)} disagree")
        return spatial | frequency


def apply_token_mask(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Zero the unselected patch tokens, keep CLS: tokens [B, 1+N, D], mask [B, N] -> [B, 1+N, D]."""
    keep = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
    return tokens * keep.unsqueeze(-1).to(tokens.dtype)


class SFTS(nn.Module):
    """Token selection with the configured budgets; no parameters.

    ``forward(rollouts, images) -> mask`` with rollouts per modality [B, h, N] and the
    normalised images per modality [B, 3, H, W]; returns M_U [B, N] bool.
    """

    def __init__(
        self, head_keep: int = 2, frequency_keep: int = 10, frequency_mode: str = "official", patch_size: int = 16,
        ties: str = "torch",
    ) -> None:
        super().__init__()
        if frequency_mode not in FREQUENCY_MODES:
            raise ValueError(f"model.frequency_mode '{frequency_mode}' is not one of {', '.join(FREQUENCY_MODES)}")
        if ties not in TIE_RULES:
            raise ValueError(f"model.sfts_ties '{ties}' is not one of {', '.join(TIE_RULES)}")
        if patch_size != 2 ** int(math.log2(patch_size)):
            raise ValueError(f"patch size {patch_size} must be a power of two")
        self.head_keep = int(head_keep)
        self.frequency_keep = int(frequency_keep)
        self.frequency_mode = frequency_mode
        self.patch_size = int(patch_size)
        self.ties = ties

    def forward(self, rollouts: Sequence[torch.Tensor], images: Sequence[torch.Tensor]) -> torch.Tensor:
        return select_tokens(
            rollouts,
            images,
            head_keep=self.head_keep,
            frequency_keep=self.frequency_keep,
            frequency_mode=self.frequency_mode,
            patch_size=self.patch_size,
            ties=self.ties,
        )

    def extra_repr(self) -> str:
        return (f"head_keep={self.head_keep}, frequency_keep={self.frequency_keep}, frequency_mode={self.frequency_mode}, "
                f"ties={self.ties}")
