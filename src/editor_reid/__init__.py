"""editor-reid: multi-modal (RGB / NIR / TIR) object re-identification built around EDITOR (CVPR 2024).

``from editor_reid import FeatureExtractor`` is the Python entry point for features
(docs/features.md). It is imported on first use, so ``import editor_reid`` (and
``editor-reid --version``) stays free of torch.
"""

__version__ = "0.1.0"

__all__ = ["FeatureExtractor", "__version__"]


def __getattr__(name: str):
    if name == "FeatureExtractor":
        from editor_reid.features.extractor import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module 'editor_reid' has no attribute {name!r}")
