"""Deployment: a persisted gallery with FAISS search, open-set thresholds, ONNX export and an
HTTP search service.

A room of its own on top of the engine and :mod:`editor_reid.features`: nothing below depends
on it, and its optional libraries (``faiss-cpu``, ``onnxruntime``, ``fastapi``; the ``deploy``
extra) are imported only by the modules that need them.
"""
