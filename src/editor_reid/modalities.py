"""The modalities of a multi-modal sample, the subsets the missing-modality evaluation uses and
the query/gallery pairs of the cross-modality evaluation.

This module is the one place that names them, and that says what an absent modality looks like
(:func:`absent_like`); everything else imports from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

__all__ = ["MODALITIES", "absent_like", "cross_modality_pairs", "modality_subsets", "pair_name", "subset_name"]

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


def cross_modality_pairs(modalities: Sequence[str] = MODALITIES) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """The standard (query subset, gallery subset) pairs of the cross-modality evaluation: every
    ordered pair of distinct single modalities, then of distinct two-modality sets (6 + 6 for
    three modalities: RGB->NI, RGB->TI, NI->RGB, ..., RGB+NI->RGB+TI, ...)."""
    out: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    for r in (1, 2):
        subsets = list(combinations(modalities, r))
        out.extend((query, gallery) for query in subsets for gallery in subsets if query != gallery)
    return out


def pair_name(query: Sequence[str], gallery: Sequence[str]) -> str:
    """``("RGB",), ("NI", "TI")`` -> ``"RGB->NI+TI"``: an ASCII arrow, so the name is the same in
    the printed table, the JSON and a shell command (``jq '."RGB->NI"'``) on any console."""
    return f"{subset_name(query)}->{subset_name(gallery)}"


def absent_like(image):
    """The stand-in for a modality a sample lacks: a zero image shaped like ``image`` (a tensor).

    Zero after normalisation is the convention of the missing-modality evaluation (TOP-ReID,
    DeMo): the model gets an input in the middle of the normalised range. Used by the model for
    a modality missing from a whole batch and by ``collate`` for one missing from some samples,
    so both cases give the same input.
    """
    return image.new_zeros(image.shape)
