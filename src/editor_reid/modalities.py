"""The modalities of a multi-modal sample, the subsets the missing-modality evaluation uses and
the query/gallery pairs of the cross-modality evaluation.

The benchmarks' three modalities are :data:`MODALITIES`; a model's modality set comes from
``datasets.modalities`` (2, 3, 4 or more names: RGB and NI for RGBN300, a fourth sensor of one's
own), put in :func:`canonical_order`. This module is the one place that names them, checks a
set of names (:func:`check_modalities`) and says what an absent modality looks like
(:func:`absent_like`); everything else imports from here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import combinations

__all__ = [
    "MAX_MODALITIES",
    "MODALITIES",
    "absent_like",
    "canonical_order",
    "check_modalities",
    "cross_modality_pairs",
    "modality_subsets",
    "pair_name",
    "subset_name",
]

#: RGB, near infrared, thermal infrared: the benchmarks' modalities, in the order the model stacks them.
MODALITIES = ("RGB", "NI", "TI")

#: The most modalities a model may have (the missing-modality sweep grows as 2^M - 1).
MAX_MODALITIES = 8

_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,15}")


def canonical_order(names: Sequence[str]) -> tuple[str, ...]:
    """The order a model stacks ``names`` in: those of :data:`MODALITIES` first, in that order,
    then the others as given (``["TI", "DEPTH", "RGB"]`` -> ``("RGB", "TI", "DEPTH")``)."""
    return (*(m for m in MODALITIES if m in names), *(m for m in names if m not in MODALITIES))


def check_modalities(names: Sequence[str]) -> str | None:
    """What is wrong with ``names`` as a model's modality set (None when nothing): one to
    :data:`MAX_MODALITIES` distinct upper-case names (letters, digits, ``_``; at most 16
    characters, starting with a letter), e.g. ``RGB``, ``NI``, ``TI``, ``DEPTH``."""
    names = list(names)
    if not names:
        return "expected at least one modality name, e.g. [RGB, NI, TI]"
    bad = [n for n in names if not isinstance(n, str) or not _NAME.fullmatch(n)]
    if bad:
        return (f"{', '.join(repr(b) for b in bad)} is not a modality name: upper-case letters, digits and _, "
                "starting with a letter, at most 16 characters (RGB, NI, TI, DEPTH, ...)")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        return f"{', '.join(repeated)} named twice"
    if len(names) > MAX_MODALITIES:
        return f"{len(names)} modalities; at most {MAX_MODALITIES}"
    return None


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
