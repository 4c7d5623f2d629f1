"""The features a deploy command works on: a feature file, or samples extracted on the spot.

``calibrate`` and ``search`` take either ``--features FEATS.npz`` or ``--weights W`` with an input
of ``editor-reid extract`` (``--dataset L --root D``, ``--manifest M``, ``--images DIR``). The
second is ``extract`` into a temporary file that is read back and deleted: one loader, one set
of checks, the same features.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from editor_reid.errors import UsageError
from editor_reid.features.store import FeatureFile, load_feature_file


def load_or_extract(*, features: str | Path | None, weights: str | Path | None, config: Any = None,
                    dataset: str | None = None, root: str | Path | None = None, manifest: str | Path | None = None,
                    images: str | Path | None = None, device: str | None = None,
                    splits: Sequence[str] = ("query", "gallery"), command: str) -> tuple[FeatureFile, str]:
    """(the feature file, a description of where it came from for messages and JSON)."""
    inputs = [name for name, value in (("--dataset", dataset), ("--manifest", manifest), ("--images", images))
              if value is not None]
    if (features is None) == (weights is None):
        raise UsageError(f"{command} needs exactly one of --features FEATS.npz or --weights W"
                         + (" (got both)" if features is not None else ""))
    if features is not None:
        if inputs or config is not None:
            raise UsageError(f"{command} --features reads its features from the file; "
                             f"{(inputs or ['--config'])[0]} goes with --weights")
        return load_feature_file(features), f"'{features}'"
    if len(inputs) != 1:
        raise UsageError(f"{command} --weights needs exactly one input: --dataset NAME --root DIR or --manifest FILE"
                         + (" or --images DIR" if command == "search" else "")
                         + (f" (got {', '.join(inputs)})" if inputs else ""))
    if dataset is not None and root is None:
        raise UsageError(f"{command} --dataset {dataset} needs --root DIR, the directory that contains the dataset "
                         "folder")
    from editor_reid.features.extract import collect_inputs, run_extract

    found = collect_inputs(dataset=dataset, root=root, manifest=manifest, images=images, splits=splits)
    with tempfile.TemporaryDirectory(prefix=f"editor-reid-{command}-") as tmp:
        out = run_extract(weights, Path(tmp) / "features.npz", config=config, inputs=found, device=device,
                          quiet=True)
        ff = load_feature_file(out)
    print(f"{command}: extracted {len(ff)} features of {found.what} with '{weights}'")
    return ff, f"{found.what}, extracted with '{weights}'"
