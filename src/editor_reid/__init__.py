"""editor-reid: multi-modal (RGB / NIR / TIR) object re-identification built around EDITOR (CVPR 2024)."""

__version__ = "0.1.0"
