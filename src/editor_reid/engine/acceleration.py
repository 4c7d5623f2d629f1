"""Optional ``torch.compile`` of the model: an engine concern, so the model itself stays free of logging."""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)

__all__ = ["maybe_compile"]


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
    if not getattr(cfg.model, "compile", False):
        return model
    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    if device != "cuda":
        log.info("model.compile is set but the model is on %s: running eager (torch.compile is used on CUDA only)", device)
        return model
    model.compile()
    return model
