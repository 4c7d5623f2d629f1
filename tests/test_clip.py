"""EDITOR on the CLIP ViT-B/16 tower: the *_clip presets, CLIP weight files in their real
containers (OpenAI TorchScript archive, open_clip .bin / .safetensors / training checkpoint), the
restricted TorchScript reader, SIE on the class token, and a tiny end-to-end run from a preset."""

from __future__ import annotations

import math
import os
import pickle
import warnings
import zipfile

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from editor_reid.config import ConfigError, load_config, resolve_config_path
from editor_reid.engine.checkpoint import load_checkpoint
from editor_reid.engine.train import train
from editor_reid.model.backbone import ViTBackbone
from editor_reid.model.editor import build_model
from editor_reid.model.pretrained import PretrainedLoadError, load_pretrained, read_torchscript_weights
from _clip_files import openai_clip_state, write_torchscript_archive

WIDTH, DEPTH, HEADS = 64, 2, 2


# ----------------------------------------------------------------------------- presets


# (dataset, size, P×K instances, batch, epochs, warmup, AL) from DeMo's configs/<DATASET>/DeMo.yml.
DEMO = {
    "rgbnt201": ([256, 128], 8, 64, 50, 10, 1),
    "rgbnt100": ([128, 256], 16, 128, 30, 5, 0),
    "msvr310": ([128, 256], 4, 64, 50, 10, 0),
}


@pytest.mark.parametrize("name", sorted(DEMO))
def test_clip_presets_carry_the_demo_recipe(name):
    cfg = load_config(resolve_config_path(f"{name}_clip"))
    size, instances, batch, epochs, warmup, al = DEMO[name]
    m, s = cfg.model, cfg.solver
    assert cfg.datasets.names == name and cfg.output_dir == f"./runs/{name}_clip"
    assert (m.transformer_type, m.pretrain_choice) == ("vit_base_patch16_clip_224", "clip")
    assert (m.sie_camera, m.sie_coe, m.sie_tokens, m.drop_path, m.al) == (True, 1.0, "cls", 0.0, al)
    assert cfg.input.size_train == cfg.input.size_test == size
    assert cfg.input.pixel_mean == cfg.input.pixel_std == [0.5, 0.5, 0.5]
    assert cfg.dataloader.num_instance == instances
    assert (s.optimizer_name, s.base_lr, s.backbone_lr, s.bias_lr_factor) == ("Adam", 3.5e-4, 5e-6, 2.0)
    assert (s.weight_decay, s.weight_decay_bias) == (1e-4, 1e-4)
    assert (s.ims_per_batch, s.max_epochs, s.warmup_iters) == (batch, epochs, warmup)
    assert (s.warmup_factor, s.eta_min_factor, s.lr_noise, s.lr_noise_seed) == (0.1, 0.001, 0.67, 42)
    # The EDITOR parts are those of the ImageNet preset of the same dataset.
    official = load_config(resolve_config_path(name))
    for key in ("head_keep", "frequency_keep", "sfts", "hma", "bcc", "ocfr", "al"):
        assert getattr(m, key) == getattr(official.model, key), key


@pytest.mark.parametrize("override, key", [
    ("solver.lr_noise=1.0", "solver.lr_noise"),
    ("solver.lr_noise=-0.1", "solver.lr_noise"),
    ("solver.backbone_lr=-1e-6", "solver.backbone_lr"),
    ("model.sie_tokens=patches", "model.sie_tokens"),
    ("solver.optimizer_name=Adagrad", "solver.optimizer_name"),
])
def test_clip_keys_are_validated(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_adam_is_accepted_in_any_case():
    assert load_config(None, ["solver.optimizer_name=adam"]).solver.optimizer_name == "Adam"


# ----------------------------------------------------------------------------- CLIP weight files


def _clip_source(arch="vit_base_patch16_clip_quickgelu_224") -> nn.Module:
    """A tiny timm CLIP tower on the real 224 grid (a 14x14 position table, like ViT-B-16.pt)."""
    torch.manual_seed(3)
    return timm.create_model(arch, pretrained=False, num_classes=0, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)


def _tiny_clip_backbone(arch="vit_base_patch16_clip_224") -> ViTBackbone:
    torch.manual_seed(0)
    return ViTBackbone(arch, (64, 32), num_cameras=3, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, drop_path=0.0)


def _demo_resize(table: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The CLIP ReID papers' resize_pos_embed (bilinear, align_corners=False) on [1+s*s, D]."""
    side = math.isqrt(table.shape[0] - 1)
    grid = table[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(rows, cols), mode="bilinear", align_corners=False)
    return torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(rows * cols, -1)])


def _assert_backbone_holds(backbone: ViTBackbone, state: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor equals the file's (in the backbone's fp32), the position table resized."""
    sd = backbone.vit.state_dict()
    f = {k: v.float() for k, v in state.items()}
    torch.testing.assert_close(sd["cls_token"][0, 0], f["visual.class_embedding"], rtol=0, atol=0)
    torch.testing.assert_close(sd["patch_embed.proj.weight"], f["visual.conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(sd["norm_pre.weight"], f["visual.ln_pre.weight"], rtol=0, atol=0)
    torch.testing.assert_close(sd["norm.bias"], f["visual.ln_post.bias"], rtol=0, atol=0)
    for i in range(DEPTH):
        p = f"visual.transformer.resblocks.{i}."
        torch.testing.assert_close(sd[f"blocks.{i}.attn.qkv.weight"], f[p + "attn.in_proj_weight"], rtol=0, atol=0)
        torch.testing.assert_close(sd[f"blocks.{i}.attn.proj.bias"], f[p + "attn.out_proj.bias"], rtol=0, atol=0)
        torch.testing.assert_close(sd[f"blocks.{i}.mlp.fc2.weight"], f[p + "mlp.c_proj.weight"], rtol=0, atol=0)
        torch.testing.assert_close(sd[f"blocks.{i}.norm2.bias"], f[p + "ln_2.bias"], rtol=0, atol=0)
    expected = _demo_resize(f["visual.positional_embedding"], *backbone.grid_size)
    torch.testing.assert_close(sd["pos_embed"][0], expected, rtol=1e-6, atol=1e-6)


def test_openai_torchscript_archive_is_read_without_torch_jit(tmp_path, monkeypatch):
    state = openai_clip_state(_clip_source())
    path = tmp_path / "ViT-B-16.pt"
    write_torchscript_archive(state, path)
    with zipfile.ZipFile(path) as archive:  # the real container: pickled module tree + TorchScript code
        names = archive.namelist()
    assert any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; the reference reader here
        reference = dict(torch.jit.load(str(path)).state_dict())

    def refuse(*args, **kwargs):
        raise AssertionError("torch.jit.load must not be used")

    monkeypatch.setattr(torch.jit, "load", refuse)
    weights = read_torchscript_weights(path)
    assert weights.keys() == reference.keys() == state.keys()
    for key, value in weights.items():
        assert value.dtype == reference[key].dtype and torch.equal(value, reference[key]), key
    assert weights["visual.conv1.weight"].dtype == torch.float16

    backbone = _tiny_clip_backbone()
    report = load_pretrained(backbone, path, "clip")
    assert report.layout == "clip"
    assert report.resized["pos_embed"] == ((1, 197, WIDTH), (1, 1 + 4 * 2, WIDTH))
    assert {"head.weight"} <= set(report.ignored_keys)  # visual.proj: the 768->512 projection is dropped
    assert set(report.missing_keys) == {"sie_embed", "fc.weight", "fc.bias"}  # trained from scratch / unused
    _assert_backbone_holds(backbone, state)


@pytest.mark.parametrize("container", ["bin", "safetensors", "training_checkpoint"])
def test_open_clip_files_load(tmp_path, container):
    state = openai_clip_state(_clip_source("vit_base_patch16_clip_224"), dtype=torch.float32)
    state.pop("input_resolution"), state.pop("context_length")  # open_clip's files do not carry them
    if container == "bin":
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save(state, path)
    elif container == "safetensors":
        path = tmp_path / "open_clip_model.safetensors"
        save_file(state, str(path))
    else:  # open_clip_train's epoch_N.pt from a DDP run
        path = tmp_path / "epoch_32.pt"
        optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))])
        torch.save({"epoch": 32, "name": "ViT-B-16-laion", "state_dict": {f"module.{k}": v for k, v in state.items()},
                    "optimizer": optimizer.state_dict()}, path)
    backbone = _tiny_clip_backbone("vit_base_patch16_clip_gelu_224")
    assert type(backbone.vit.blocks[0].mlp.act) is nn.GELU
    report = load_pretrained(backbone, path, "clip")
    assert report.layout == "clip"
    _assert_backbone_holds(backbone, state)


def _archive_with_pickle(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", payload)
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
        archive.writestr("evil/code/__torch__.py", "def forward(self):\n    pass\n")
        archive.writestr("evil/version", "3\n")


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Eval:
    def __reduce__(self):
        return eval, ("__import__('os').system('true')",)


def test_malicious_torchscript_archive_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "ViT-B-16.pt"
    _archive_with_pickle(path, pickle.dumps({"visual.proj": _System(f"touch {marker}")}, protocol=2))
    backbone = _tiny_clip_backbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    with pytest.raises(PretrainedLoadError, match=r"ViT-B-16\.pt.*global '(posix|nt)\.system' is not allowed"):
        load_pretrained(backbone, path, "clip")
    assert not marker.exists()
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    _archive_with_pickle(path, pickle.dumps(_Eval(), protocol=2))
    with pytest.raises(PretrainedLoadError, match=r"global '(__builtin__|builtins)\.eval' is not allowed"):
        read_torchscript_weights(path)


def test_torchscript_classes_become_inert_containers(tmp_path):
    # A `__torch__` global called with arguments (REDUCE) or rebuilt (NEWOBJ + BUILD) only holds data.
    payload = (
        b"\x80\x02c__torch__.evil\nModule\nq\x00X\x06\x00\x00\x00rm -rfq\x01\x85q\x02Rq\x03"  # Module("rm -rf")
        b"}q\x04X\x01\x00\x00\x00wq\x05K\x07sb."  # BUILD with {"w": 7}
    )
    path = tmp_path / "archive.pt"
    _archive_with_pickle(path, payload)
    assert read_torchscript_weights(path) == {}  # no tensors, nothing run
    _archive_with_pickle(path, pickle.dumps([1, 2], protocol=2))
    with pytest.raises(PretrainedLoadError, match="not a TorchScript module"):
        read_torchscript_weights(path)


def test_truncated_storage_is_a_clear_error(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    write_torchscript_archive({"visual.proj": torch.randn(8, 4)}, path)
    damaged = tmp_path / "damaged.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(damaged, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            dst.writestr(item, data[:10] if "/data/" in item.filename else data)
    with pytest.raises(PretrainedLoadError, match=r"damaged\.pt.*holds 10 bytes, expected 128"):
        read_torchscript_weights(damaged)


# ----------------------------------------------------------------------------- SIE on CLIP


def test_sie_on_the_class_token_only():
    torch.manual_seed(0)
    images, cams = torch.randn(2, 3, 64, 32), torch.tensor([0, 2])
    every = _tiny_clip_backbone()
    cls = ViTBackbone("vit_base_patch16_clip_224", (64, 32), num_cameras=3, embed_dim=WIDTH, depth=DEPTH,
                      num_heads=HEADS, drop_path=0.0, sie_tokens="cls")
    cls.load_state_dict(every.state_dict())
    vit = every.vit
    # Before ln_pre: [CLS + SIE; patches] + pos, as DeMo's VisionTransformer.forward.
    x = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(images)], dim=1) + vit.pos_embed
    x[:, 0] += every.sie_coe * every.sie_embed[cams][:, 0]
    torch.testing.assert_close(cls.embed(images, cams), vit.norm_pre(x))
    assert not torch.allclose(every.embed(images, cams)[:, 1:], cls.embed(images, cams)[:, 1:])
    with pytest.raises(ValueError, match="model.sie_tokens 'patch'"):
        ViTBackbone("vit_base_patch16_clip_224", (64, 32), sie_tokens="patch", embed_dim=WIDTH, depth=DEPTH,
                    num_heads=HEADS)


# ----------------------------------------------------------------------------- end to end


def _tiny_preset(data_root, out, weights) -> list[str]:
    return [
        f"model.pretrain_path={weights}", "model.embed_dim=64", "model.depth=2", "model.num_heads=2",
        "model.head_keep=1", "model.frequency_keep=2", "input.size_train=[64,32]", "input.size_test=[64,32]",
        "dataloader.num_workers=0", "dataloader.num_instance=2", "solver.ims_per_batch=8", "solver.max_epochs=1",
        "solver.max_steps_per_epoch=2", "solver.amp=none", "solver.log_period=1", "test.ims_per_batch=64",
        f"datasets.root_dir={data_root}", f"output_dir={out}",
    ]


def test_clip_preset_trains_end_to_end_from_an_openai_archive(train_data, tmp_path):
    state = openai_clip_state(_clip_source())
    weights = tmp_path / "ViT-B-16.pt"
    write_torchscript_archive(state, weights)
    cfg = load_config(resolve_config_path("rgbnt201_clip"), _tiny_preset(train_data, tmp_path / "run", weights))
    summary = train(cfg, quiet=True)
    assert summary["final"]["epoch"] == 1
    assert all(math.isfinite(v) for v in summary["final"]["metrics"].values())
    header = (tmp_path / "run" / "config.yaml").read_text().splitlines()[0]
    assert header == f"# initialisation: clip weights from {weights}"
    trained = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    # Loading: the model the trainer builds (same sizes as the run's) holds the archive's weights before any step.
    model = build_model(cfg, num_classes=6, num_cameras=trained["backbone.sie_embed"].shape[0], pretrained=True)
    assert model.state_dict().keys() == trained.keys()
    _assert_backbone_holds(model.backbone, state)
    assert model.backbone.sie_tokens == "cls" and model.backbone.sie_coe == 1.0
    start = model.state_dict()
    moved = [k for k in start if k.startswith("backbone.vit.") and not torch.equal(trained[k], start[k])]
    assert moved, "the backbone did not train"
    # Adam moves a tensor by about its LR per step: the CLIP tower at backbone_lr (5e-6, times at
    # most 1.67 for the LR noise), the new modules at base_lr (3.5e-4).
    def largest_change(prefix: str) -> float:
        return max((trained[k] - start[k]).abs().max().item() for k in start if k.startswith(prefix)
                   and start[k].is_floating_point())

    assert largest_change("backbone.vit.") < 2 * 2 * 1.67 * 5e-6
    assert largest_change("backbone.sie_embed") > 1e-4  # the SIE table trains at base_lr
