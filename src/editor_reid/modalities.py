"""The modalities of a multi-modal sample and the subsets the missing-modality evaluation uses.

This module is the one place that names them, and that says what an absent modality looks like
(:func:`absent_like`); everything else imports from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

__all__ = ["MODALITIES", "absent_like", "modality_subsets", "subset_name"]

#: RGB, near infrared, thermal infrared, in the order the model stacks them.
MODALITIES = ("RGB", "NI", "TI")


def modality_subsets(modalities: Sequence[str] = MODALITIES) -> list[tuple[str, ...]]:
    """The non-empty subsets in a fixed order: singles, pairs, then all (7 for three modalities)."""
    out: list[tuple[str, ...]] = []
    for r in range(1, len(modalities) + 1):
        out.extend(combinations(modalities, r))
    return out


def subset_name(subset: Sequence[str]) -> str:
    """``("RGB", "TI")`` -> ``"RGB+TI"``."""
    return "+".join(subset)


def absent_like(image):
    """The stand-in for a modality a sample lacks: a zero image shaped like ``image`` (a tensor).

    Zero after normalisation is the convention of the missing-modality evaluation (TOP-ReID,
    DeMo): the model gets an input in the middle of the normalised range. Used by the model for
    a modality missing from a whole batch and by ``collate`` for one missing from some samples,
    so both cases give the same input.
    """
    return image.new_zeros(image.shape)
