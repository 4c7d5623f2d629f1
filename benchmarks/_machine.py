"""The CPU's name for the benchmarks' headers (every figure is reported with the machine)."""

from __future__ import annotations

from editor_reid.engine.acceleration import cpu_name

__all__ = ["cpu_name"]
