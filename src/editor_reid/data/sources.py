"""The configured dataset: a layout under ``datasets.root_dir`` or a manifest, in one call.

Every command that reads "the dataset of the configuration" (train, test, info) goes through
:func:`load_configured`, so a manifest works wherever a layout does.
"""

from __future__ import annotations

from collections.abc import Sequence

from editor_reid.data.layouts import MANIFEST, SPLIT_NAMES, DatasetSplits, format_statistics, load_dataset
from editor_reid.config import ConfigError
from editor_reid.data.manifest import read_manifest
from editor_reid.modalities import canonical_order

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
        loaded = read_manifest(datasets.manifest, splits=splits, protocol=protocol, modalities=datasets.modalities)
    else:
        loaded = load_dataset(datasets.names, datasets.root_dir, splits=splits)
        if protocol:
            loaded.protocol = protocol
    _check_modalities(loaded, datasets)
    if verbose:
        print(format_statistics(loaded))
    return loaded


def _check_modalities(loaded: DatasetSplits, datasets) -> None:
    """A configured modality that no sample has would be a zero image everywhere: a mistake."""
    samples = [*loaded.train, *loaded.query, *loaded.gallery]
    if not samples:
        return
    have = canonical_order(list(dict.fromkeys(m for s in samples for m in s.paths)))
    absent = [m for m in datasets.modalities if m not in have]
    if absent:
        source = f"manifest '{datasets.manifest}'" if datasets.names == MANIFEST else datasets.names
        raise ConfigError(f"config key 'datasets.modalities' names {', '.join(absent)}, but no sample of {source} "
                          f"has {'that modality' if len(absent) == 1 else 'those modalities'} (it has "
                          f"{', '.join(have)}); list only modalities the data has")
