"""``model.lean_mlp``: the MLPs keep their GELU input, not its output, for the backward pass. The
forward is bit-identical, the gradients equal the plain MLP's to float rounding (fp32 and bf16
autocast), and a training step saves less."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Mlp

from _tiny import tiny_cfg
from editor_reid.losses import EditorCriterion
from editor_reid.model import build_model
from editor_reid.model._mlp import gelu_mlp
from editor_reid.model._timm import mlp_forward

MODS = ("RGB", "NI", "TI")


def _grads(fn, tensors):
    out = fn(*tensors)
    out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype))
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("bias", [True, False])
def test_gelu_mlp_equals_the_plain_mlp(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    w1 = torch.randn(64, 16, generator=g, requires_grad=True)
    w2 = torch.randn(16, 64, generator=g, requires_grad=True)
    b1 = torch.randn(64, generator=g, requires_grad=True) if bias else None
    b2 = torch.randn(16, generator=g, requires_grad=True) if bias else None
    tensors = [t for t in (x, w1, b1, w2, b2) if t is not None]

    def plain(*ts):
        x, w1, *rest = ts
        b1, w2, b2 = rest if bias else (None, rest[0], None)
        return torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)

    def lean(*ts):
        x, w1, *rest = ts
        b1, w2, b2 = rest if bias else (None, rest[0], None)
        return gelu_mlp(x, w1, b1, w2, b2)

    out_plain, grads_plain = _grads(plain, tensors)
    out_lean, grads_lean = _grads(lean, tensors)
    assert torch.equal(out_plain, out_lean)
    for a, b in zip(grads_plain, grads_lean):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gelu_mlp_under_bf16_autocast_matches_autocasts_gradients():
    torch.manual_seed(0)
    mlp = Mlp(16, 64)
    mlp.lean = True
    x = torch.randn(2, 5, 16, requires_grad=True)
    results = []
    for lean in (False, True):
        mlp.lean = lean
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = mlp_forward(mlp, x)
        out.float().sum().backward()
        results.append((out.detach(), x.grad.clone(), [p.grad.clone() for p in mlp.parameters()]))
        x.grad = None
        mlp.zero_grad(set_to_none=True)
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    assert out_b.dtype == torch.bfloat16 and torch.equal(out_a, out_b)
    assert gx_b.dtype == torch.float32 and all(g.dtype == torch.float32 for g in gp_b)
    assert torch.allclose(gx_a, gx_b, rtol=2e-2, atol=1e-3)
    for a, b in zip(gp_a, gp_b):
        assert torch.allclose(a, b, rtol=2e-2, atol=1e-2)


def test_an_mlp_lean_cannot_compute_runs_as_it_is():
    """Dropout in training (and any act but exact GELU) keeps timm's own forward."""
    mlp = Mlp(16, 64, drop=0.5).train()
    mlp.lean = True
    x = torch.randn(4, 16, requires_grad=True)
    torch.manual_seed(3)
    expected = mlp(x)
    torch.manual_seed(3)
    assert torch.equal(mlp_forward(mlp, x), expected)
    quick = Mlp(16, 64, act_layer=torch.nn.SiLU)
    quick.lean = True
    assert torch.equal(mlp_forward(quick, x), quick(x))


def _step(cfg, images, cams, targets):
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5, num_cameras=3).train()
    criterion = EditorCriterion(cfg, 5, model.embed_dim)
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(1)  # the same drop-path draws
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = criterion(model(images, cams), targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return model, loss.detach(), grads, sum(saved.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_lean_training_step_has_the_plain_gradients_and_saves_less(checkpointing):
    g = torch.Generator().manual_seed(0)
    images = {m: torch.randn(4, 3, 64, 32, generator=g) for m in MODS}
    cams, targets = torch.arange(4) % 3, torch.tensor([0, 0, 1, 1])
    runs = {}
    for lean in (False, True):
        cfg = tiny_cfg((64, 32), **{"model.drop_path": 0.2, "model.lean_mlp": lean,
                                    "model.grad_checkpointing": checkpointing})
        runs[lean] = _step(cfg, images, cams, targets)
    (plain, loss_a, grads_a, saved_a), (lean_model, loss_b, grads_b, saved_b) = runs[False], runs[True]
    assert lean_model.backbone.vit.blocks[0].mlp.lean and lean_model.hma.fusion_block.mlp.lean
    assert not plain.backbone.vit.blocks[0].mlp.lean
    assert torch.allclose(loss_a, loss_b, rtol=0, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 50
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7), name
    if not checkpointing:
        # At least the backbone MLPs' GELU outputs are gone: 3 modalities x 4 samples x 9 tokens x
        # the hidden width, per block, in fp32.
        vit = lean_model.backbone.vit
        tokens = 1 + (64 // 16) * (32 // 16)
        gelu_out = len(vit.blocks) * 3 * 4 * tokens * vit.blocks[0].mlp.fc1.out_features * 4
        assert saved_a - saved_b >= gelu_out
    with torch.no_grad():
        assert torch.equal(plain.eval()(images, cams), lean_model.eval()(images, cams))
