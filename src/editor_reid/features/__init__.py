"""Features outside training: the feature file, the :class:`FeatureExtractor` and ``extract``.

A room of its own on top of the engine: it uses the model, the data layer and the engine's
checkpoint loading, and nothing below it depends on it. The feature file (``store``) needs only
NumPy; the extractor and ``run_extract`` import torch, on first use.
"""

from editor_reid.features.store import FeatureFile, FeatureFileError, load_feature_file, save_feature_file

__all__ = ["FeatureFile", "FeatureFileError", "load_feature_file", "save_feature_file", "FeatureExtractor",
           "run_extract"]


def __getattr__(name: str):
    if name == "FeatureExtractor":
        from editor_reid.features.extractor import FeatureExtractor

        return FeatureExtractor
    if name == "run_extract":
        from editor_reid.features.extract import run_extract

        return run_extract
    raise AttributeError(f"module 'editor_reid.features' has no attribute {name!r}")
