"""Losses (docs/official-behaviour.md#losses) against hand computations and the official formulations."""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from editor_reid.config import load_config
from editor_reid.losses import (
    LOSS_TERMS,
    EditorCriterion,
    NonFiniteLossError,
    OCFRLoss,
    bcc_loss,
    check_finite,
    cross_entropy_label_smooth,
    euclidean_dist,
    soft_margin_triplet,
    triplet_loss,
)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------- ID loss


def test_label_smoothed_ce_matches_explicit_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([2, 0])
    eps, k = 0.1, 3

    def log_softmax(row):
        z = math.log(sum(math.exp(v) for v in row))
        return [v - z for v in row]

    expected = 0.0
    for row, y in zip(logits.tolist(), targets.tolist()):
        lp = log_softmax(row)
        target = [(1 - eps) * (c == y) + eps / k for c in range(k)]
        expected += -sum(t * l for t, l in zip(target, lp))
    expected /= 2
    got = cross_entropy_label_smooth(logits, targets, eps=0.1)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_label_smoothed_ce_eps_zero_is_plain_ce_and_fp16_input_ok():
    torch.manual_seed(0)
    logits = torch.randn(6, 5)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    assert cross_entropy_label_smooth(logits, targets, eps=0.0).item() == pytest.approx(
        F.cross_entropy(logits, targets).item(), rel=1e-6)
    out = cross_entropy_label_smooth(logits.half(), targets)
    assert out.dtype == torch.float32


def test_label_smoothed_ce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        cross_entropy_label_smooth(torch.zeros(3), torch.zeros(3, dtype=torch.long))


# --------------------------------------------------------------------------- triplet

# d(0,1)=3  d(0,2)=4  d(0,3)=10  d(1,2)=5  d(1,3)=sqrt(73)  d(2,3)=sqrt(52)
FEAT4 = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [6.0, 8.0]])
LABELS4 = torch.tensor([0, 0, 1, 1])


def test_euclidean_dist_matches_hand_values():
    d = euclidean_dist(FEAT4, FEAT4)
    assert d[0, 1].item() == pytest.approx(3.0)
    assert d[1, 3].item() == pytest.approx(math.sqrt(73), rel=1e-6)
    assert d[2, 3].item() == pytest.approx(math.sqrt(52), rel=1e-6)
    assert d[0, 0].item() == pytest.approx(1e-6)  # sqrt of the 1e-12 clamp


def test_soft_margin_triplet_batch_hard_by_hand():
    # anchor: (hardest positive, hardest negative)
    pairs = [(3.0, 4.0), (3.0, 5.0), (math.sqrt(52), 4.0), (math.sqrt(52), math.sqrt(73))]
    expected = sum(softplus(ap - an) for ap, an in pairs) / 4
    assert soft_margin_triplet(FEAT4, LABELS4).item() == pytest.approx(expected, rel=1e-6)
    assert triplet_loss(FEAT4, LABELS4).item() == pytest.approx(expected, rel=1e-6)


def test_margin_triplet_by_hand():
    pairs = [(3.0, 4.0), (3.0, 5.0), (math.sqrt(52), 4.0), (math.sqrt(52), math.sqrt(73))]
    expected = sum(max(0.0, ap - an + 0.3) for ap, an in pairs) / 4
    assert triplet_loss(FEAT4, LABELS4, margin=0.3).item() == pytest.approx(expected, rel=1e-6)


def test_triplet_is_stable_for_large_distances_and_has_gradients():
    feat = (FEAT4 * 1000).requires_grad_()
    loss = triplet_loss(feat, LABELS4)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(feat.grad).all() and feat.grad.abs().sum() > 0


def test_triplet_single_identity_gives_zero():
    assert triplet_loss(FEAT4, torch.zeros(4, dtype=torch.long)).item() == 0.0


def test_triplet_under_bf16_autocast_stays_float32():
    torch.manual_seed(1)
    feat = torch.randn(8, 16) * 5
    labels = torch.arange(4).repeat_interleave(2)
    ref = triplet_loss(feat, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = triplet_loss(feat, labels)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=1e-5)


def test_triplet_global_gather_equals_single_process_batch():
    torch.manual_seed(2)
    feat = torch.randn(8, 6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    whole = triplet_loss(feat, labels)
    halves = [(feat[:4], labels[:4]), (feat[4:], labels[4:])]

    def gather_for(rank):
        def gather(t):
            # The rank's own rows, then the other's, in rank order.
            parts = [f if t.is_floating_point() else y for f, y in halves]
            parts[rank] = t
            return torch.cat(parts)
        return gather

    per_rank = [triplet_loss(f, y, gather=gather_for(r)) for r, (f, y) in enumerate(halves)]
    assert (sum(per_rank) / 2).item() == pytest.approx(whole.item(), rel=1e-6)
    # Per-rank mining alone differs: each half has only two identities.
    assert triplet_loss(*halves[0]).item() != pytest.approx(whole.item(), rel=1e-3)


# --------------------------------------------------------------------------- BCC


def _tokens(values, cls):
    # [B=1, 1+N=3, D=1]
    return torch.tensor([[[cls], [values[0]], [values[1]]]])


def test_bcc_by_hand_three_two_one_modalities():
    mask = torch.tensor([[True, False]])  # patch 0 foreground, patch 1 background
    tokens = {"RGB": _tokens([1.0, 2.0], 100.0), "NI": _tokens([3.0, 5.0], -50.0), "TI": _tokens([7.0, 0.0], 9.0)}
    # background patch only: R=2, N=5, T=0; mean over B*N*D = 2 elements.
    assert bcc_loss(tokens, mask).item() == pytest.approx((9 + 4 + 25) / 2)
    two = {"RGB": tokens["RGB"], "TI": tokens["TI"]}
    assert bcc_loss(two, mask).item() == pytest.approx(4 / 2)
    assert bcc_loss({"NI": tokens["NI"]}, mask).item() == 0.0


def test_bcc_equals_per_position_formula_and_grads_flow_to_all():
    torch.manual_seed(3)
    b, n, d = 2, 5, 4
    tokens = {m: torch.randn(b, 1 + n, d, requires_grad=True) for m in ("RGB", "NI", "TI")}
    mask = torch.rand(b, n) > 0.5
    loss = bcc_loss(tokens, mask)
    r, ni, t = (tokens[m][:, 1:].detach() for m in ("RGB", "NI", "TI"))
    bg = (~mask).float().unsqueeze(-1)
    per_pos = ((r - ni) ** 2 + (r - t) ** 2 + (ni - t) ** 2) * bg
    assert loss.item() == pytest.approx(per_pos.sum().item() / (b * n * d), rel=1e-6)
    loss.backward()
    for m in ("RGB", "NI", "TI"):
        grad = tokens[m].grad
        assert grad[:, 0].abs().sum() == 0  # CLS excluded
        assert grad[:, 1:][mask].abs().sum() == 0  # foreground excluded
        assert grad.abs().sum() > 0


def test_bcc_all_foreground_is_zero_and_shape_errors():
    tokens = {m: torch.randn(1, 3, 2) for m in ("RGB", "NI")}
    assert bcc_loss(tokens, torch.ones(1, 2, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="tokens\\['RGB'\\]"):
        bcc_loss(tokens, torch.ones(1, 3, dtype=torch.bool))


# --------------------------------------------------------------------------- OCFR


def test_ocfr_ema_two_steps_by_hand():
    ocfr = OCFRLoss(num_classes=3, dim=2, modalities=("RGB",), momentum=0.8).train()
    # step 1: label 1 twice; normalised [0.6, 0.8] and [0, 1]; mean [0.3, 0.9]
    loss1 = ocfr({"RGB": torch.tensor([[3.0, 4.0], [0.0, 2.0]])}, torch.tensor([1, 1]))
    c1 = [0.8 * 0.3, 0.8 * 0.9]
    assert ocfr.RGB_centers[1].tolist() == pytest.approx(c1)
    assert ocfr.RGB_centers[0].tolist() == [0.0, 0.0]
    expected1 = ((c1[0] - 0.6) ** 2 + (c1[1] - 0.8) ** 2 + (c1[0] - 0.0) ** 2 + (c1[1] - 1.0) ** 2) / 4
    assert loss1.item() == pytest.approx(expected1, rel=1e-6)
    # step 2: label 1 -> [1, 0], label 2 -> [0, 1]
    loss2 = ocfr({"RGB": torch.tensor([[2.0, 0.0], [0.0, 5.0]])}, torch.tensor([1, 2]))
    c1b = [0.8 * 1.0 + 0.2 * c1[0], 0.8 * 0.0 + 0.2 * c1[1]]
    c2 = [0.0, 0.8]
    assert ocfr.RGB_centers[1].tolist() == pytest.approx(c1b)
    assert ocfr.RGB_centers[2].tolist() == pytest.approx(c2)
    assert ocfr.RGB_centers[0].tolist() == [0.0, 0.0]
    expected2 = ((c1b[0] - 1) ** 2 + c1b[1] ** 2 + c2[0] ** 2 + (c2[1] - 1) ** 2) / 4
    assert loss2.item() == pytest.approx(expected2, rel=1e-6)


def test_ocfr_sums_modalities_applies_weight_and_eval_does_not_update():
    torch.manual_seed(4)
    feats = {m: torch.randn(4, 3) for m in ("RGB", "NI", "TI")}
    labels = torch.tensor([0, 0, 1, 1])
    single = {m: OCFRLoss(2, 3, ("RGB", "NI", "TI"))(({m: f}), labels) for m, f in feats.items()}
    both = OCFRLoss(2, 3, ("RGB", "NI", "TI"), weight=0.5)(feats, labels)
    assert both.item() == pytest.approx(0.5 * sum(v.item() for v in single.values()), rel=1e-6)

    ocfr = OCFRLoss(2, 3).eval()
    loss = ocfr(feats, labels)
    assert all(ocfr.centers(m).abs().sum() == 0 for m in ("RGB", "NI", "TI"))
    # zero centres: loss = mean of squared unit vectors = 1 / D per modality
    assert loss.item() == pytest.approx(3 * (1 / 3), rel=1e-6)


def test_ocfr_gradient_flows_to_features_only():
    ocfr = OCFRLoss(2, 3, ("RGB",))
    feat = torch.randn(4, 3, requires_grad=True)
    ocfr({"RGB": feat}, torch.tensor([0, 0, 1, 1])).backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0
    assert not ocfr.RGB_centers.requires_grad
    assert list(ocfr.parameters()) == []
    assert set(ocfr.state_dict()) == {"RGB_centers"}


def _official_ocfr_step(centers, feat, labels, momentum):
    """The official contiguous P x K formulation (OCFR.py, docs/official-behaviour.md#loss-ocfr), as a reference."""
    f = feat / feat.norm(dim=1, keepdim=True)
    uniq = torch.unique(labels, sorted=True)
    for y in uniq.tolist():
        centers[y] = momentum * f[labels == y].mean(0) + (1 - momentum) * centers[y]
    chunk = labels.numel() // uniq.numel()
    group_labels = labels[::chunk]
    target = centers[group_labels].repeat_interleave(chunk, dim=0)
    return F.mse_loss(f, target)


def test_ocfr_shuffled_batch_equals_contiguous_and_official():
    torch.manual_seed(5)
    p, k, d, classes = 4, 3, 8, 10
    labels = torch.tensor([7, 2, 9, 4]).repeat_interleave(k)  # contiguous P x K blocks
    official_centers = torch.zeros(classes, d)
    ocfr_contig = OCFRLoss(classes, d, ("RGB",))
    ocfr_shuffled = OCFRLoss(classes, d, ("RGB",))
    for _ in range(3):
        feat = torch.randn(p * k, d)
        ref = _official_ocfr_step(official_centers, feat, labels, 0.8)
        contig = ocfr_contig({"RGB": feat}, labels)
        perm = torch.randperm(p * k)
        shuffled = ocfr_shuffled({"RGB": feat[perm]}, labels[perm])
        assert contig.item() == pytest.approx(ref.item(), rel=1e-5)
        assert shuffled.item() == pytest.approx(ref.item(), rel=1e-5)
        torch.testing.assert_close(ocfr_contig.RGB_centers, official_centers)
        torch.testing.assert_close(ocfr_shuffled.RGB_centers, official_centers)


def test_ocfr_all_reduce_hook_keeps_ranks_identical_to_global_batch():
    torch.manual_seed(6)
    d, classes = 4, 5
    feat = torch.randn(8, d)
    labels = torch.tensor([0, 1, 0, 3, 1, 3, 4, 0])  # an uneven split: not contiguous blocks
    single = OCFRLoss(classes, d, ("RGB",))
    single({"RGB": feat}, labels)

    world = 2
    barrier = threading.Barrier(world)
    slots: list = [None] * world

    def make_all_reduce(rank):
        def all_reduce(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            t.copy_(total)
        return all_reduce

    ranks = [OCFRLoss(classes, d, ("RGB",), all_reduce=make_all_reduce(r)) for r in range(world)]
    shards = [(feat[:3], labels[:3]), (feat[3:], labels[3:])]  # unequal sizes too
    threads = [threading.Thread(target=ranks[r], args=({"RGB": shards[r][0]}, shards[r][1])) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    for r in range(world):
        torch.testing.assert_close(ranks[r].RGB_centers, single.RGB_centers)


def test_ocfr_process_group_path_single_rank(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        feat, labels = torch.randn(6, 3), torch.tensor([0, 0, 1, 1, 2, 2])
        with_group = OCFRLoss(3, 3, ("TI",), all_reduce=dist.group.WORLD)
        plain = OCFRLoss(3, 3, ("TI",))
        assert with_group({"TI": feat}, labels).item() == pytest.approx(plain({"TI": feat}, labels).item())
        torch.testing.assert_close(with_group.TI_centers, plain.TI_centers)
    finally:
        dist.destroy_process_group()


def test_ocfr_load_official_centers_and_errors():
    ocfr = OCFRLoss(2, 3)
    rgb, nir, tir = torch.ones(2, 3), torch.full((2, 3), 2.0), torch.full((2, 3), 3.0)
    ocfr.load_official_centers({"RGB": rgb, "NIR_centers": nir, "TI": tir})
    assert torch.equal(ocfr.RGB_centers, rgb)
    assert torch.equal(ocfr.NI_centers, nir)
    assert torch.equal(ocfr.TI_centers, tir)
    with pytest.raises(ValueError, match="shape"):
        ocfr.load_official_centers({"RGB": torch.zeros(3, 3)})
    with pytest.raises(KeyError, match="XYZ"):
        ocfr.load_official_centers({"XYZ": rgb})
    with pytest.raises(ValueError, match="labels"):
        ocfr({"RGB": torch.randn(2, 3)}, torch.tensor([0, 2]))


# --------------------------------------------------------------------------- criterion

K, D = 4, 6


def _output(al: int, *, hma=True, seed=0, modalities=("RGB", "NI", "TI")):
    g = torch.Generator().manual_seed(seed)
    b, n = 8, 5

    def r(*shape):
        return torch.randn(*shape, generator=g, requires_grad=True)

    if al == 1:
        logits, feats = [r(b, K)], [r(b, 3 * D)]
    else:
        logits, feats = [r(b, K) for _ in modalities], [r(b, D) for _ in modalities]
    return SimpleNamespace(
        fused_logits=r(b, K),
        fused_feat=r(b, 3 * D),
        backbone_logits=logits,
        backbone_feats=feats,
        backbone_tokens={m: r(b, 1 + n, D) for m in modalities},
        token_mask=torch.rand(b, n, generator=g) > 0.4,
        hma_cls={m: r(b, D) for m in modalities} if hma else None,
    )


TARGETS = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])


@pytest.mark.parametrize("al", [1, 0])
def test_criterion_combines_terms_per_setting(al):
    cfg = load_config(None, [f"model.al={al}"])
    crit = EditorCriterion(cfg, K, D).train()
    out = _output(al)
    total, terms = crit(out, TARGETS)
    assert tuple(terms) == LOSS_TERMS
    reference_ocfr = OCFRLoss(K, D)
    expected = {
        "id_fused": cross_entropy_label_smooth(out.fused_logits, TARGETS, 0.1),
        "tri_fused": soft_margin_triplet(out.fused_feat, TARGETS),
        "id_backbone": sum(cross_entropy_label_smooth(s, TARGETS, 0.1) for s in out.backbone_logits),
        "tri_backbone": sum(soft_margin_triplet(f, TARGETS) for f in out.backbone_feats),
        "bcc": bcc_loss(out.backbone_tokens, out.token_mask),
        "ocfr": reference_ocfr(out.hma_cls, TARGETS),
    }
    for key, value in expected.items():
        assert terms[key].item() == pytest.approx(value.item(), rel=1e-5), key
    assert total.item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-5)
    torch.testing.assert_close(crit.ocfr.RGB_centers, reference_ocfr.RGB_centers)
    total.backward()
    assert out.fused_feat.grad is not None and out.hma_cls["NI"].grad is not None
    assert out.backbone_tokens["TI"].grad is not None
    assert len(out.backbone_logits) == (1 if al == 1 else 3)


def test_criterion_toggles_weights_and_margin():
    overrides = ["model.bcc=false", "model.ocfr=false", "model.id_loss_weight=0.5",
                 "model.triplet_loss_weight=2.0", "model.no_margin=false", "solver.margin=0.3",
                 "model.if_labelsmooth=false"]
    crit = EditorCriterion(load_config(None, overrides), K, D)
    out = _output(1, seed=1)
    total, terms = crit(out, TARGETS)
    assert terms["bcc"].item() == 0.0 and terms["ocfr"].item() == 0.0
    assert terms["id_fused"].item() == pytest.approx(0.5 * F.cross_entropy(out.fused_logits, TARGETS).item(), rel=1e-5)
    assert terms["tri_fused"].item() == pytest.approx(2.0 * triplet_loss(out.fused_feat, TARGETS, 0.3).item(), rel=1e-5)
    assert crit.ocfr.RGB_centers.abs().sum() == 0
    assert total.item() == pytest.approx(sum(v.item() for v in terms.values()), rel=1e-6)

    weighted = EditorCriterion(load_config(None, ["model.bcc_weight=2.0", "model.ocfr_weight=3.0"]), K, D)
    _, wterms = weighted(out, TARGETS)
    assert wterms["bcc"].item() == pytest.approx(2 * bcc_loss(out.backbone_tokens, out.token_mask).item(), rel=1e-5)
    assert wterms["ocfr"].item() == pytest.approx(3 * OCFRLoss(K, D)(out.hma_cls, TARGETS).item(), rel=1e-5)


def test_criterion_without_hma_and_with_two_modalities():
    crit = EditorCriterion(load_config(None), K, D)
    _, terms = crit(_output(1, hma=False), TARGETS)
    assert terms["ocfr"].item() == 0.0
    out = _output(0, modalities=("RGB", "TI"), seed=2)
    _, terms = crit(out, TARGETS)
    assert terms["bcc"].item() == pytest.approx(bcc_loss(out.backbone_tokens, out.token_mask).item(), rel=1e-6)
    assert crit.ocfr.NI_centers.abs().sum() == 0 and crit.ocfr.TI_centers.abs().sum() > 0


def test_criterion_scope_controls_distributed_hooks():
    def refuse(_):
        raise AssertionError("hook must not be called for local scope")

    local = EditorCriterion(load_config(None, ["model.triplet_scope=local", "model.ocfr_scope=local"]), K, D,
                            gather=refuse, all_reduce=refuse)
    local(_output(1), TARGETS)

    calls = []

    def gather(t):
        calls.append("gather")
        return t

    def all_reduce(t):
        calls.append("all_reduce")

    glob = EditorCriterion(load_config(None), K, D, gather=gather, all_reduce=all_reduce)
    glob(_output(1), TARGETS)
    assert calls.count("gather") == 4  # (feat, targets) for the fused and the ori triplet
    assert calls.count("all_reduce") == 3  # one per modality


def test_criterion_state_dict_carries_centres_and_loads_official():
    crit = EditorCriterion(load_config(None), K, D)
    assert set(crit.state_dict()) == {"ocfr.RGB_centers", "ocfr.NI_centers", "ocfr.TI_centers"}
    crit.load_official_centers({"RGB": torch.ones(K, D), "NI": torch.ones(K, D), "TIR": torch.ones(K, D)})
    other = EditorCriterion(load_config(None), K, D)
    other.load_state_dict(crit.state_dict())
    assert torch.equal(other.ocfr.TI_centers, torch.ones(K, D))


def test_check_finite_names_term_epoch_step():
    check_finite({"id_fused": torch.tensor(1.0), "bcc": 0.5}, epoch=1, step=2)
    terms = {"id_fused": torch.tensor(1.0), "bcc": torch.tensor(float("nan")), "ocfr": torch.tensor(float("inf"))}
    with pytest.raises(NonFiniteLossError) as info:
        check_finite(terms, epoch=4, step=17)
    message = str(info.value)
    assert "'bcc'" in message and "'ocfr'" in message and "'id_fused'" not in message
    assert "epoch 4" in message and "step 17" in message
    assert set(info.value.terms) == {"bcc", "ocfr"} and info.value.epoch == 4 and info.value.step == 17
    with pytest.raises(NonFiniteLossError, match="'total'"):
        check_finite({"total": float("-inf")}, epoch=0, step=0)
    check_finite({}, epoch=0, step=0)
