"""Deployment: a persisted gallery with FAISS search (or a Milvus collection), open-set
thresholds, ONNX export and an HTTP search service.

A room of its own on top of the engine and :mod:`editor_reid.features`: nothing below depends
on it (``extract --to-gallery`` hands :func:`editor_reid.features.extract.run_extract` a sink
made here), and its optional libraries (``faiss-cpu``, ``onnxruntime``, ``fastapi``: the
``deploy`` extra; ``pymilvus``, ``milvus-lite``: the ``milvus`` extra) are imported only by the
modules that need them.
"""
