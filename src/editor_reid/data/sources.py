"""The configured dataset: a layout under ``datasets.root_dir`` or a manifest, in one call.

Every command that reads "the dataset of the configuration" (train, test, info) goes through
:func:`load_configured`, so a manifest works wherever a layout does.
"""

from __future__ import annotations

from collections.abc import Sequence

from editor_reid.data.layouts import MANIFEST, SPLIT_NAMES, DatasetSplits, format_statistics, load_dataset
from editor_reid.data.manifest import read_manifest

__all__ = ["load_configured"]


def load_configured(datasets, *, splits: Sequence[str] = SPLIT_NAMES, verbose: bool = False) -> DatasetSplits:
    """Load the dataset that ``datasets`` (a config's ``datasets`` section) names.

    ``datasets.names`` "manifest" reads ``datasets.manifest`` (:func:`~editor_reid.data.manifest.read_manifest`);
    a layout name reads ``datasets.root_dir`` (:func:`~editor_reid.data.layouts.load_dataset`).
    A non-empty ``datasets.protocol`` replaces the layout's protocol, or the manifest's own.
    ``splits`` and ``verbose`` (print the statistics table) are those of ``load_dataset``.
    """
    protocol = datasets.protocol or None
    if datasets.names == MANIFEST:
        loaded = read_manifest(datasets.manifest, splits=splits, protocol=protocol)
    else:
        loaded = load_dataset(datasets.names, datasets.root_dir, splits=splits)
        if protocol:
            loaded.protocol = protocol
    if verbose:
        print(format_statistics(loaded))
    return loaded
