"""Features outside training: the feature file, the :class:`FeatureExtractor` and ``extract``.

A room of its own on top of the engine: it uses the model, the data layer and the engine's
checkpoint loading, and nothing below it depends on it.
"""

from editor_reid.features.store import FeatureFile, FeatureFileError, load_feature_file, save_feature_file

__all__ = ["FeatureFile", "FeatureFileError", "load_feature_file", "save_feature_file"]
