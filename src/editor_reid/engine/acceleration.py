"""Device-level execution settings of a run: optional ``torch.compile``, deterministic kernels,
and handing freed host memory back to the system.

An engine concern, so the model itself stays free of logging and global switches.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
from collections.abc import Iterator

import torch
from torch import nn

log = logging.getLogger(__name__)

__all__ = ["maybe_compile", "determinism", "release_freed_memory", "cpu_bf16_native", "cpu_name", "resolve_amp"]

_warned_slow_bf16 = False


def _cpuinfo(field: str) -> str:
    """The first ``field`` line of Linux's /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.split(":", 1)[0].strip() == field:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo's ``model name``), else what ``platform`` knows; named
    with every speed figure (benchmarks, the report's environment)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_bf16_native() -> tuple[bool, str]:
    """(whether this CPU computes bf16 natively, a description): native means the AVX512-BF16 or
    AMX-BF16 instructions (/proc/cpuinfo flags ``avx512_bf16`` / ``amx_bf16``); the description
    also names torch's CPU capability (``torch.backends.cpu.get_cpu_capability()``)."""
    flags = set(_cpuinfo("flags").split())
    native = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    what = f"{', '.join(native)}; torch capability {capability}" if native else (
        f"no AVX512-BF16 or AMX-BF16; torch capability {capability}")
    return bool(native), what


def resolve_amp(amp: str, device: torch.device | str) -> str:
    """The precision ``amp`` ("none", "fp16", "bf16" or "auto") means on ``device``.

    "auto": bf16 on a CUDA device that supports it (fp16 on one that does not), bf16 on a CPU
    with native bf16 (:func:`cpu_bf16_native`), fp32 ("none") on any other CPU, where bf16 is
    emulated and slower than fp32. An explicit "bf16" on such a CPU is kept, with one warning per
    process saying why it will be slow.
    """
    global _warned_slow_bf16
    kind = torch.device(device).type
    if amp == "auto":
        if kind == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_bf16_native()[0] else "none"
    if amp == "bf16" and kind == "cpu" and not _warned_slow_bf16:
        native, what = cpu_bf16_native()
        if not native:
            _warned_slow_bf16 = True
            log.warning("bf16 on a CPU without native bf16 (%s): bf16 is emulated there and usually several times "
                        "slower than fp32; amp 'auto' or 'none' keeps fp32", what)
    return amp


@contextlib.contextmanager
def determinism(enabled: bool, device: torch.device) -> Iterator[None]:
    """Deterministic kernels inside the block when ``enabled`` (solver.deterministic); the previous
    setting is restored on exit."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    if enabled:
        if device.type == "cuda":
            # cuBLAS needs a fixed workspace for deterministic GEMMs; set before the first CUDA GEMM.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def maybe_compile(model: nn.Module, cfg) -> nn.Module:
    """Apply ``torch.compile`` to ``model`` in place when ``cfg.model.compile`` is set; returns it.

    ``nn.Module.compile`` keeps the module, its class and its state-dict keys (no ``_orig_mod.``
    prefix), so checkpoints and ``isinstance`` checks are unaffected. Compilation happens only
    when the model's parameters are on CUDA. On CPU the eager model is returned with a logged
    notice: there, Inductor took over two minutes to compile even a 2-block test model and
    recompiled for every new kept-token count of SFTS, for slower steps than eager. The token
    selection's data-dependent shapes are graph breaks; Dynamo marks the kept-token dimension
    dynamic after the first recompilation.
    """
    if not cfg.model.compile:
        return model
    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    if device != "cuda":
        log.info("model.compile is set but the model is on %s: running eager (torch.compile is used on CUDA only)", device)
        return model
    model.compile()
    return model


def release_freed_memory() -> bool:
    """Return the C heap's freed pages to the system (glibc ``malloc_trim(0)``); True if it ran.

    For a training process after an evaluation pass (docs/performance.md#memory-over-a-long-run):
    glibc keeps the freed evaluation temporaries; the next training steps place their tensors in
    that memory, so each later evaluation no longer fits in it and extends the heap. Trimming
    once per evaluation keeps the resident set from growing with every evaluation, at the cost of
    the next step faulting its pages in again. Tensors and results are untouched. Does nothing
    (False) where the C library is not glibc.
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True
