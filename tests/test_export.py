"""``editor-reid export --format onnx`` and the onnxruntime backend: the graph, its metadata, parity
with the PyTorch model (dynamic batch, unknown cameras, absent modalities, per-sample token
selection), ``extract --backend onnxruntime``, ``FeatureExtractor.from_onnx`` and the errors.

Ties at a top-k boundary of SFTS are broken by ``torch.topk`` in an implementation-defined way
and by onnxruntime's ``TopK`` in favour of the lower index (docs/export.md#token-selection), so
the parity inputs are drawn without such ties, as in tests/test_parity.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _cli import exit_code, one_line  # noqa: E402
from _features import NUM_CAMERAS, tiny_weights  # noqa: E402
from _tiny import tiny_cfg  # noqa: E402

import editor_reid
from editor_reid.cli import main
from editor_reid.config import config_to_dict
from editor_reid.deploy.export import METADATA_KEYS, ExportGraph, OnnxUnavailableError, export_model
from editor_reid.deploy.onnx_runtime import OnnxGraphError, OnnxModel
from editor_reid.errors import UsageError
from editor_reid.features import FeatureExtractor, load_feature_file
from editor_reid.features.extract import run_extract
from editor_reid.model import build_model
from editor_reid.model.sfts import frequency_scores

MODS = ("RGB", "NI", "TI")
RTOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-row relative error max|a - b| / max|b|."""
    return float(((a - b).abs().amax(dim=1) / b.abs().amax(dim=1)).max())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(tmp, data root, checkpoint, exported ONNX file, the checkpoint's eager model, what export printed)."""
    tmp = tmp_path_factory.mktemp("export")
    data, weights = tiny_weights(tmp)
    onnx_path = tmp / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert main(["export", "--weights", str(weights), "--format", "onnx", "--out", str(onnx_path)]) == 0
    model = FeatureExtractor(weights, device="cpu").model.eval()
    return tmp, data, weights, onnx_path, model, printed.getvalue()


def clear_inputs(model, batch: int, seed: int = 0, absent: str | None = None):
    """``batch`` random triplets whose SFTS boundaries have no exact or near ties (each sample
    drawn until its frequency counts and rollout scores separate at the top-k boundaries), and
    cameras cycling through -1 (unknown), 0, 1, ...; ``absent``: that modality is left out."""
    sfts, found, g = model.sfts, [], torch.Generator().manual_seed(seed)
    while len(found) < batch:
        images = {m: torch.randn(1, 3, *model.backbone.img_size, generator=g) for m in MODS}
        if absent:
            images[absent] = torch.zeros_like(images[absent])
        top = frequency_scores([images[m] for m in MODS]).topk(sfts.frequency_keep + 1).values[0]
        with torch.no_grad():
            row = model.backbone(torch.cat([images[m] for m in MODS]), torch.zeros(3, dtype=torch.long)).rollout
        gaps = row.topk(sfts.head_keep + 1, dim=-1).values
        if top[-2] > top[-1] and bool((gaps[..., -2] - gaps[..., -1] > 1e-4 * gaps[..., -2]).all()):
            found.append(images)
    images = {m: torch.cat([f[m] for f in found]) for m in MODS if m != absent}
    return images, torch.arange(batch) % (NUM_CAMERAS + 1) - 1


def _torch(model, images, cams):
    with torch.no_grad():
        return model(images, cams), model.last_token_mask.clone()


# ----------------------------------------------------------------------------- the file


def test_export_writes_a_graph_with_a_dynamic_batch_and_its_metadata(setup):
    _, _, weights, onnx_path, model, _ = setup
    import onnx

    graph = onnx.load(onnx_path)
    meta = {p.key: json.loads(p.value) for p in graph.metadata_props}
    assert set(METADATA_KEYS) <= set(meta)
    extractor = FeatureExtractor(weights, device="cpu")
    assert meta["editor_reid.fingerprint"] == extractor.fingerprint
    assert meta["editor_reid.config"] == config_to_dict(extractor.cfg)
    assert meta["editor_reid.feature_dim"] == 192 and meta["editor_reid.num_cameras"] == NUM_CAMERAS
    assert meta["editor_reid.version"] == editor_reid.__version__
    assert meta["editor_reid.input_size"] == [64, 32] and meta["editor_reid.modalities"] == list(MODS)
    assert meta["editor_reid.pixel_mean"] == list(extractor.cfg.input.pixel_mean)
    inputs = {i.name: i.type.tensor_type for i in graph.graph.input}
    assert list(inputs) == [*MODS, "cam_ids"]
    for name, tensor in inputs.items():
        assert tensor.shape.dim[0].dim_param, f"{name}: the batch axis is not symbolic"
    assert inputs["cam_ids"].elem_type == onnx.TensorProto.INT64
    assert [o.name for o in graph.graph.output] == ["feature", "token_mask"]


def test_export_prints_what_it_wrote(setup):
    line, note = setup[5].strip().splitlines()
    assert line.startswith(f"export: wrote '{setup[3]}'") and "dynamic batch" in line and "192-d" in line
    assert OnnxModel(setup[3]).fingerprint in line
    assert note.startswith("export: note: model.sfts_ties is 'torch'")  # the default rule: ties may differ


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("batch", [1, 5])
def test_onnxruntime_equals_pytorch_for_any_batch_size(setup, batch):
    model, graph = setup[4], OnnxModel(setup[3])
    images, cams = clear_inputs(model, batch, seed=batch)
    assert (cams == -1).any()  # unknown cameras: the mean SIE embedding
    ref, mask = _torch(model, images, cams)
    out = graph(images, cams)
    assert out.shape == (batch, 192) and out.dtype == torch.float32
    assert torch.equal(graph.last_token_mask, mask)
    assert _rel(out, ref) < RTOL


def test_token_selection_is_per_sample_and_data_dependent(setup):
    model, graph = setup[4], OnnxModel(setup[3])
    images, cams = clear_inputs(model, 6, seed=11)
    ref, mask = _torch(model, images, cams)
    out = graph(images, cams)
    kept = graph.last_token_mask
    assert torch.equal(kept, mask) and _rel(out, ref) < RTOL
    assert len(set(kept.sum(dim=1).tolist())) > 1  # different token counts within one batch
    assert len({tuple(row.tolist()) for row in kept}) > 2  # different tokens
    # The same graph on other images selects other tokens, and still matches.
    other, _ = clear_inputs(model, 6, seed=12)
    ref2, mask2 = _torch(model, other, cams)
    assert not torch.equal(mask2, mask)
    out2 = graph(other, cams)
    assert torch.equal(graph.last_token_mask, mask2) and _rel(out2, ref2) < RTOL


def test_an_absent_modality_is_a_zero_image(setup):
    model, graph = setup[4], OnnxModel(setup[3])
    images, cams = clear_inputs(model, 3, seed=3, absent="NI")
    ref, mask = _torch(model, images, cams)  # the model feeds absent_like(RGB)
    out = graph(images, cams)  # the wrapper feeds zeros
    assert torch.equal(graph.last_token_mask, mask) and _rel(out, ref) < RTOL
    explicit = graph({**images, "NI": torch.zeros_like(images["RGB"])}, cams)
    assert torch.equal(explicit, out)


@pytest.mark.parametrize("switches", [{"model.sfts": "false"}, {"model.hma": "false"}, {"model.sie_camera": "false"},
                                      {"model.frequency_mode": "highpass"}])
def test_the_export_graph_equals_the_model_under_its_switches(switches):
    # ExportGraph in PyTorch (the module the exporter traces) against the model's own eval path.
    torch.manual_seed(0)
    model = build_model(tiny_cfg(**switches), num_classes=5, num_cameras=3).eval()
    images, cams = clear_inputs(model, 4, seed=1)
    cams = cams.clamp(max=2)
    ref, mask = _torch(model, images, cams)
    with torch.no_grad():
        out, kept = ExportGraph(model)(*[images[m] for m in MODS], cams)
    assert torch.equal(kept, mask) and _rel(out, ref) < 1e-5


def test_a_model_without_sie_keeps_the_camera_input(tmp_path):
    # Also: the Python entry point, a chosen opset, an --out in a folder that does not exist yet.
    torch.manual_seed(0)
    cfg = tiny_cfg(**{"model.sie_camera": "false", "model.sfts": "false"})
    model = build_model(cfg, num_classes=5, num_cameras=3).eval()
    path = export_model(model, cfg, tmp_path / "sub" / "m.onnx", opset=18)
    import onnx

    assert onnx.load(path, load_external_data=False).opset_import[0].version == 18
    graph = OnnxModel(path)
    assert graph.num_cameras is None and [i.name for i in graph.session.get_inputs()] == [*MODS, "cam_ids"]
    images, _ = clear_inputs(model, 2, seed=0)
    ref, _ = _torch(model, images, None)
    assert _rel(graph(images), ref) < RTOL  # camera ids are optional without SIE
    assert _rel(graph(images, torch.tensor([5, 7])), ref) < RTOL


# ----------------------------------------------------------------------------- the backend


def test_extract_with_onnxruntime_equals_extract_with_pytorch(setup, capsys):
    tmp, data, weights, onnx_path, _, _ = setup
    common = ["--dataset", "rgbnt201", "--root", str(data), "--no-normalize", "--device", "cpu"]
    assert main(["extract", "--weights", str(weights), *common, "--out", str(tmp / "torch.npz")]) == 0
    assert main(["extract", "--backend", "onnxruntime", "--onnx", str(onnx_path), *common,
                 "--out", str(tmp / "ort.npz")]) == 0
    assert "wrote 44 features" in capsys.readouterr().out
    a, b = load_feature_file(tmp / "torch.npz"), load_feature_file(tmp / "ort.npz")
    assert _rel(torch.from_numpy(b.features), torch.from_numpy(a.features)) < RTOL
    assert a.fingerprint == b.fingerprint and b.weights == str(onnx_path)
    assert np.array_equal(a.pid, b.pid) and np.array_equal(a.camid, b.camid)


def test_from_onnx_behaves_like_the_checkpoint_extractor(setup):
    _, _, weights, onnx_path, _, _ = setup
    reference = FeatureExtractor(weights, device="cpu")
    extractor = FeatureExtractor.from_onnx(onnx_path, device="cpu", batch_size=2)
    mine, theirs = config_to_dict(extractor.cfg), config_to_dict(reference.cfg)
    assert mine == {**theirs, "test": {**theirs["test"], "ims_per_batch": 2}}
    assert extractor.batch_size == 2
    for name in ("feature_dim", "modalities", "num_cameras", "fingerprint"):
        assert getattr(extractor, name) == getattr(reference, name), name
    rng = np.random.default_rng(0)
    samples = [{"RGB": rng.integers(0, 256, (80, 40, 3), dtype=np.uint8), "camid": 2},
               {"TI": rng.integers(0, 256, (64, 32, 3), dtype=np.uint8), "NI": rng.integers(0, 256, (64, 32, 3),
                                                                                         dtype=np.uint8)},
               {"NI": torch.rand(1, 70, 30), "camera": None}]
    got, want = extractor(samples, normalize=False), reference(samples, normalize=False)
    assert got.shape == (3, 192) and got.dtype == np.float32
    assert _rel(torch.from_numpy(got), torch.from_numpy(want)) < RTOL
    assert np.allclose(np.linalg.norm(extractor(samples[:1]), axis=1), 1.0)
    with pytest.raises(Exception, match="camera 9 is not in the checkpoint's SIE table"):
        extractor([{"RGB": samples[0]["RGB"], "camid": 9}])


def test_the_runtime_model_checks_its_inputs(setup):
    graph = OnnxModel(setup[3])
    images = {"RGB": torch.zeros(2, 3, 64, 32)}
    with pytest.raises(ValueError, match="camera id out of range"):
        graph(images, torch.tensor([0, -2]))
    with pytest.raises(ValueError, match="pass the camera ids"):
        graph(images)
    with pytest.raises(ValueError, match="expected \\[2, 3, 64, 32\\]"):
        graph({"RGB": torch.zeros(2, 3, 64, 32), "NI": torch.zeros(2, 3, 32, 64)}, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="non-empty subset"):
        graph({"XX": torch.zeros(2, 3, 64, 32)}, torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize("argv, message", [
    (["export", "--out", "m.onnx"], "the following arguments are required: --weights"),
    (["export", "--weights", "w.pt", "--format", "tflite", "--out", "m.onnx"], "argument --format: invalid choice"),
    (["export", "--weights", "w.pt", "--opset", "11", "--out", "m.onnx"], "argument --opset: invalid value '11'"),
    (["extract", "--images", "x", "--out", "f.npz"], "one of the arguments --weights --onnx is required"),
    (["extract", "--weights", "w.pt", "--onnx", "m.onnx", "--images", "x", "--out", "f.npz"],
     "argument --onnx: not allowed with argument --weights"),
])
def test_command_line_mistakes_exit_two(argv, message, capsys):
    assert exit_code(argv) == 2
    assert message in one_line(capsys.readouterr().err)


def test_backend_mistakes_are_one_line_usage_errors(setup, capsys):
    tmp, data, weights, onnx_path, _, _ = setup
    source = ["--images", str(data), "--out", str(tmp / "never.npz")]
    cases = [
        (["--backend", "onnxruntime", "--weights", str(weights)], "--backend onnxruntime runs an exported model"),
        (["--backend", "torch", "--onnx", str(onnx_path)], "--onnx runs with --backend onnxruntime"),
        (["--onnx", str(onnx_path), "--config", "rgbnt201"], "--config goes with --weights"),
        (["--onnx", str(onnx_path), "--amp", "bf16"], "--amp bf16 goes with --backend torch"),
        (["--onnx", str(tmp / "none.onnx")], "ONNX file"),
    ]
    for argv, message in cases:
        assert exit_code(["extract", *argv, *source]) == 2, argv
        assert message in one_line(capsys.readouterr().err)
    assert not (tmp / "never.npz").exists()
    with pytest.raises(UsageError, match="exactly one model"):
        run_extract(weights, tmp / "never.npz", onnx=onnx_path, images=data)


def test_a_file_that_is_not_an_export_is_refused(setup, tmp_path, capsys):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    argv = ["extract", "--onnx", str(garbage), "--images", str(setup[1]), "--out", str(tmp_path / "f.npz")]
    assert exit_code(argv) == 1
    assert "is not a readable ONNX file" in one_line(capsys.readouterr().err)
    import onnx
    from onnx import TensorProto, helper

    plain = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(OnnxGraphError, match="not an ONNX file written by 'editor-reid export'"):
        FeatureExtractor.from_onnx(tmp_path / "plain.onnx")


def test_missing_onnx_packages_give_one_line_with_the_extra(setup, tmp_path, monkeypatch, capsys):
    _, data, weights, onnx_path, _, _ = setup
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    assert exit_code(["export", "--weights", str(weights), "--out", str(tmp_path / "m.onnx")]) == 1
    line = one_line(capsys.readouterr().err)
    assert "'onnxscript'" in line and 'pip install "editor-reid[onnx]"' in line
    assert not (tmp_path / "m.onnx").exists()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(OnnxUnavailableError, match="the onnxruntime backend needs the Python package 'onnxruntime'"):
        FeatureExtractor.from_onnx(onnx_path)


def test_with_lower_index_ties_the_export_matches_on_tied_inputs(tmp_path):
    """model.sfts_ties=lower_index: equal scores at the top-k cut-off keep the lower patch index in
    PyTorch as in ONNX's TopK, so a triplet with ties (dark images: every frequency count 0)
    selects the same patches and gives the same feature in both."""
    cfg = tiny_cfg(**{"model.sfts_ties": "lower_index"})
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5, num_cameras=NUM_CAMERAS).eval()
    g = torch.Generator().manual_seed(0)
    images = {m: -torch.rand(3, 3, *model.backbone.img_size, generator=g) for m in MODS}  # all below zero
    scores = frequency_scores([images[m] for m in MODS])
    assert bool((scores == 0).all())  # a tie across every patch: only the rule decides
    cams = torch.tensor([-1, 0, 1])
    ref, mask = _torch(model, images, cams)
    graph = OnnxModel(export_model(model, cfg, tmp_path / "ties.onnx"))
    out = graph(images, cams)
    assert torch.equal(graph.last_token_mask, mask) and _rel(out, ref) < RTOL


def test_lower_index_ties_keep_the_first_of_equal_scores():
    from editor_reid.model.sfts import topk_mask

    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    assert topk_mask(scores, 2, "lower_index").tolist() == [[False, True, True, False, False],
                                                           [True, True, False, False, False]]
    assert topk_mask(scores, 2).sum(dim=-1).tolist() == [2, 2]  # "torch": some two of the tied


def test_export_can_switch_the_tie_rule(setup, tmp_path, capsys):
    _, _, weights, *_ = setup
    out = tmp_path / "lower.onnx"
    assert main(["export", "--weights", str(weights), "--sfts-ties", "lower_index", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "export: wrote" in printed and "note" not in printed
    meta = OnnxModel(out).session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["editor_reid.config"])["model"]["sfts_ties"] == "lower_index"
