"""What a training step keeps for its backward pass, tensor by tensor, and who made it.

A training step's memory is the model and optimiser state plus everything autograd saves in the
forward pass for the backward pass. This script runs EDITOR's training forward and loss once
under ``torch.autograd.graph.saved_tensors_hooks`` and attributes every saved tensor to the
module that was running (a global forward pre-hook keeps the stack; block indices are folded, so
``backbone.vit.blocks.*.mlp.fc2`` sums over the blocks) and to the operation that produced it
(its ``grad_fn``; "input" for a tensor autograd did not make, such as the images). Storages are
counted once, however many ops save them, and parameters are not counted as activations.

::

    python benchmarks/bench_saved.py                               # ViT-B/16, 128x256, batch 8 triplets
    python benchmarks/bench_saved.py --tiny --sizes 256x128        # quick check
    python benchmarks/bench_saved.py --lean-mlp off                # as the model was before model.lean_mlp

It prints the total saved, the largest holders, and the model, gradient and optimiser-state
sizes beside them, in MiB. docs/performance.md ("What a step holds") has the study it supports.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict

import torch

import bench_model as bm  # benchmarks/ is on sys.path when a script runs
from _machine import cpu_name
from editor_reid.engine.solver import autocast_context
from editor_reid.losses import EditorCriterion

MIB = 2**20


def account(model, criterion, images, cams, targets, amp: str) -> tuple[dict, int]:
    """(bytes saved for backward by (module, producer), total bytes) for one training forward."""
    names = {id(module): re.sub(r"\.\d+(?=\.|$)", ".*", name) or "(model)" for name, module in model.named_modules()}
    names.update({id(module): "criterion." + name if name else "criterion" for name, module in criterion.named_modules()})
    params = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *criterion.parameters()]}
    stack: list[str] = []
    seen: set[int] = set()
    holders: dict[tuple[str, str], int] = defaultdict(int)

    def pre(module, args):
        stack.append(names.get(id(module), type(module).__name__))

    def post(module, args, output):
        stack.pop()

    def pack(tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen and storage.nbytes():
            seen.add(key)
            producer = type(tensor.grad_fn).__name__.removesuffix("Backward0") if tensor.grad_fn else "input"
            holders[(stack[-1] if stack else "(outside)", producer)] += storage.nbytes()
        return tensor

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(pre),
               torch.nn.modules.module.register_module_forward_hook(post)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_context("cpu", amp):
            out = model(images, cams)
            loss = criterion(out, targets)[0]
    finally:
        for handle in handles:
            handle.remove()
    loss.backward()  # the graph is freed; the gradients show that it was whole
    return dict(holders), sum(holders.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="128x256", help="input size HxW (RGBNT100's by default)")
    parser.add_argument("--tiny", action="store_true", help=f"tiny ViT {bm.TINY} instead of ViT-B/16")
    parser.add_argument("--train-batch", type=int, default=8, help="triplets (2 per identity)")
    parser.add_argument("--num-classes", type=int, default=171)
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--lean-mlp", default="on", choices=["on", "off"], help="model.lean_mlp")
    parser.add_argument("--top", type=int, default=14, help="holders to list")
    args = parser.parse_args(argv)
    # bench_model's builders read these.
    args.embed_dim = args.depth = args.heads = 0
    args.compile = args.grad_checkpointing = False
    args.inputs = "synthetic"
    size = bm.parse_size(args.sizes)
    cfg = bm.make_config(args, size)
    cfg.model.lean_mlp = args.lean_mlp == "on"
    torch.manual_seed(0)
    model = bm.build_model(cfg, num_classes=args.num_classes, num_cameras=bm.NUM_CAMERAS)
    bm.perturb_norms(model)
    model.train()
    criterion = EditorCriterion(cfg, args.num_classes, model.embed_dim)
    images, cams, targets = bm.make_inputs(args.train_batch, size, "cpu", seed=1)
    holders, total = account(model, criterion, images, cams, targets, args.amp)
    param_bytes = sum(p.numel() * p.element_size() for p in [*model.parameters(), *criterion.parameters()])

    print(f"saved for backward: EDITOR {'tiny' if args.tiny else 'ViT-B/16'}, {size[0]}x{size[1]}, "
          f"{args.train_batch} triplets, amp {args.amp}, model.lean_mlp {args.lean_mlp}; {cpu_name()}")
    print(f"total saved: {total / MIB:.1f} MiB; parameters {param_bytes / MIB:.1f} MiB, their gradients as much, "
          f"SGD momentum as much")
    print(f"{'MiB':>8}  {'share':>6}  module (blocks folded) : producer")
    for (module, producer), nbytes in sorted(holders.items(), key=lambda item: -item[1])[:args.top]:
        print(f"{nbytes / MIB:8.1f}  {nbytes / total:6.1%}  {module} : {producer}")
    rest = total - sum(sorted(holders.values(), reverse=True)[:args.top])
    print(f"{rest / MIB:8.1f}  {rest / total:6.1%}  ({max(0, len(holders) - args.top)} more)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
