"""Synthetic multi-modal ReID data written in the real benchmark layouts.

``make_synthetic(layout, out)`` renders a small dataset whose directory tree and file names
are exactly those of the real benchmark, so ``load_dataset(layout, out)`` and ``check_data``
read it through the same parsers. It exists for the demo, for tests and for trying the
pipeline without downloading anything.

What makes an identity: an object (a person-like figure for person layouts, a car-like
box for vehicle layouts) whose proportions, part colours, texture pattern and accessories are
drawn once per identity. What varies per image: camera (horizontal viewpoint flip, colour
cast, lighting), scale, position, pose (person stride/arm swing), a cluttered background
of random shapes and noise. NI is a low-contrast grey rendering with identity-specific
reflectances; TI is a pseudo-coloured heat image in which the object is warm and some
background clutter is lukewarm.

The ground-truth object mask of every image is written beside the data in
``<out>/<DatasetFolder>_masks/`` mirroring the image path (PNG, 255 = object); see
``mask_path_for`` and ``load_mask``. The parsers never look there.
"""

from __future__ import annotations

import colorsys
import json
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from editor_reid.errors import UsageError
from editor_reid.modalities import MODALITIES
from editor_reid.data.layouts import LAYOUTS, STRIP_WIDTH, Layout, Sample, get_layout

__all__ = ["make_synthetic", "mask_path_for", "load_mask", "MARKER_FILE", "DEFAULT_VIEWS", "SyntheticArgumentError"]

#: Written into the dataset folder so a later run may safely replace a synthetic tree.
MARKER_FILE = ".synthetic.json"
#: Images per identity and camera (per scene and camera for MSVR310).
DEFAULT_VIEWS = 3
_JPEG_QUALITY = 92


class SyntheticArgumentError(UsageError, ValueError):
    """A count or seed :func:`make_synthetic` cannot use (the command line exits 2 with it)."""


# Per layout: object kind, image size (H, W) of one modality, camera count, largest legal pid.
_GEOMETRY = {
    "rgbnt201": ("person", (128, 64), 4, 999_999),
    "market1501mm": ("person", (128, 64), 6, 1501),
    "rgbnt100": ("vehicle", (128, STRIP_WIDTH), 8, 600),
    "msvr310": ("vehicle", (128, 256), 8, 9999),
    "rgbn300": ("vehicle", (128, STRIP_WIDTH), 8, 600),
    "wmveid863": ("vehicle", (128, 256), 8, 9999),
}

# Person parts (indices into the per-identity colour tables); 0 is background.
_HEAD, _TORSO, _ARMS, _LEGS, _SHOES, _BAG, _HAIR = 1, 2, 3, 4, 5, 6, 7
# Vehicle parts.
_BODY, _CABIN, _WINDOWS, _WHEELS, _LIGHTS, _CARGO = 1, 2, 3, 4, 5, 6
_NUM_PARTS = 8
_PERSON_CANVAS = (100, 40)  # H, W of the canonical sprite
_VEHICLE_CANVAS = (90, 200)


# ----------------------------------------------------------------------------- identities


@dataclass
class _Identity:
    kind: str
    rgb: np.ndarray  # [_NUM_PARTS, 3] colour per part, in [0, 1]
    accent: np.ndarray  # [3] second colour of the textured part
    ni: np.ndarray  # [_NUM_PARTS] near-infrared reflectance per part
    ni_accent: float
    heat: np.ndarray  # [_NUM_PARTS] temperature per part (background ~0.2, object 0.55-0.95)
    pattern: str  # texture of the torso / body: plain, hstripes, vstripes, checker, diagonal
    period: int
    shape: dict[str, float]


def _colour(rng: np.random.Generator, sat=(0.25, 0.95), val=(0.2, 0.95)) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(*sat), rng.uniform(*val)))


def _make_identity(kind: str, rng: np.random.Generator) -> _Identity:
    rgb = np.zeros((_NUM_PARTS, 3))
    ni = np.zeros(_NUM_PARTS)
    heat = np.zeros(_NUM_PARTS)
    for part in range(1, _NUM_PARTS):
        rgb[part] = _colour(rng)
        ni[part] = rng.uniform(0.2, 0.9)
    if kind == "person":
        skin = np.array(colorsys.hsv_to_rgb(rng.uniform(0.03, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.35, 0.95)))
        rgb[_HEAD] = skin
        rgb[_HAIR] = _colour(rng, sat=(0.0, 0.6), val=(0.05, 0.6))
        rgb[_SHOES] = _colour(rng, val=(0.05, 0.5))
        if rng.random() < 0.5:  # long sleeves share the top's colour
            rgb[_ARMS] = rgb[_TORSO]
        heat[_HEAD], heat[_HAIR], heat[_BAG] = 0.95, 0.85, 0.35
        clothing = rng.uniform(0.6, 0.85)  # thick clothes are cooler
        heat[_TORSO] = clothing
        heat[_ARMS] = clothing + rng.uniform(-0.05, 0.1)
        heat[_LEGS] = rng.uniform(0.55, 0.8)
        heat[_SHOES] = rng.uniform(0.5, 0.65)
        shape = {
            "width": rng.uniform(0.8, 1.2),
            "legs": rng.uniform(0.40, 0.50),
            "head": rng.uniform(0.10, 0.14),
            "bag": float(rng.random() < 0.45),
            "bag_side": float(rng.random() < 0.5),
            "long_hair": float(rng.random() < 0.35),
        }
    else:
        rgb[_WINDOWS] = _colour(rng, sat=(0.0, 0.3), val=(0.05, 0.35))
        rgb[_WHEELS] = np.array([0.08, 0.08, 0.08]) + rng.uniform(0, 0.08)
        rgb[_LIGHTS] = _colour(rng, sat=(0.0, 0.4), val=(0.8, 1.0))
        if rng.random() < 0.6:  # most cars have one colour for body and roof
            rgb[_CABIN] = rgb[_BODY]
        heat[_CABIN], heat[_WINDOWS], heat[_LIGHTS], heat[_CARGO] = 0.55, 0.3, 0.9, 0.5
        heat[_BODY] = rng.uniform(0.5, 0.7)
        heat[_WHEELS] = rng.uniform(0.7, 0.9)  # warm tyres and brakes
        shape = {
            "type": float(rng.integers(0, 4)),  # sedan, SUV, van, truck
            "height": rng.uniform(0.8, 1.1),
            "cabin_start": rng.uniform(0.2, 0.35),
            "cabin_len": rng.uniform(0.35, 0.55),
            "wheel": rng.uniform(0.8, 1.2),
        }
    return _Identity(
        kind=kind,
        rgb=rgb,
        accent=_colour(rng),
        ni=ni,
        ni_accent=float(rng.uniform(0.2, 0.9)),
        heat=heat,
        pattern=str(rng.choice(["plain", "hstripes", "vstripes", "checker", "diagonal"])),
        period=int(rng.integers(3, 8)),
        shape=shape,
    )


def _draw_person(ident: _Identity, rng: np.random.Generator) -> np.ndarray:
    """The canonical part map [H, W] of one pose (stride and arm swing vary per image)."""
    h, w = _PERSON_CANVAS
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    s = ident.shape
    cx = w / 2
    head = s["head"] * h
    torso_w = 0.5 * w * s["width"]
    neck = 2 + head
    hip = h * (1 - s["legs"])
    foot = h - 4
    stride = rng.uniform(0.0, 0.28) * w
    swing = rng.uniform(-0.15, 0.15) * w
    if s["long_hair"]:
        d.rectangle([cx - head * 0.55, 2 + head * 0.4, cx + head * 0.55, neck + head * 0.6], fill=_HAIR)
    # Legs before the torso so the hip joint is hidden.
    for sign in (-1, 1):
        d.line([(cx + sign * torso_w * 0.22, hip - 2), (cx + sign * stride / 2, foot)], fill=_LEGS, width=max(3, int(w * 0.16)))
        d.ellipse([cx + sign * stride / 2 - 4, foot - 3, cx + sign * stride / 2 + 4, foot + 3], fill=_SHOES)
    d.rounded_rectangle([cx - torso_w / 2, neck, cx + torso_w / 2, hip], radius=3, fill=_TORSO)
    for sign in (-1, 1):
        top = (cx + sign * torso_w / 2, neck + 3)
        d.line([top, (cx + sign * (torso_w / 2 + 3) + sign * swing * 0.3, hip + swing * sign * 0.2)], fill=_ARMS, width=max(2, int(w * 0.1)))
    d.ellipse([cx - head / 2, 2, cx + head / 2, 2 + head], fill=_HEAD)
    d.pieslice([cx - head / 2, 2, cx + head / 2, 2 + head], 180, 360, fill=_HAIR)
    if s["bag"]:
        side = 1 if s["bag_side"] else -1
        bx = cx + side * torso_w / 2
        d.rectangle([bx - 5, (neck + hip) / 2, bx + 5, hip + 4], fill=_BAG)
    return np.asarray(img)


def _draw_vehicle(ident: _Identity, rng: np.random.Generator) -> np.ndarray:
    """The canonical part map [H, W] of a side view facing right."""
    h, w = _VEHICLE_CANVAS
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    s = ident.shape
    kind = int(s["type"])
    wheel_r = 11 * s["wheel"]
    bottom = h - wheel_r * 0.9
    body_top = bottom - 28 * s["height"] * (1.4 if kind == 2 else 1.0)
    roof = max(2.0, body_top - 24 * s["height"])
    c0 = s["cabin_start"] * w
    c1 = min(w - 10, c0 + s["cabin_len"] * w * (1.5 if kind in (1, 2) else 1.0))
    if kind == 3:  # truck: cabin at the front, tall cargo box behind it
        d.rectangle([6, roof, w * 0.62, bottom], fill=_CARGO)
        c0, c1 = w * 0.66, w - 14
    d.rounded_rectangle([4, body_top, w - 4, bottom], radius=6, fill=_BODY)
    d.polygon([(c0, body_top), (c0 + 12, roof), (c1 - 14, roof), (c1, body_top)], fill=_CABIN)
    d.polygon([(c0 + 6, body_top - 2), (c0 + 15, roof + 4), (c1 - 16, roof + 4), (c1 - 6, body_top - 2)], fill=_WINDOWS)
    d.rectangle([w - 12, body_top + 4, w - 5, body_top + 10], fill=_LIGHTS)
    jitter = rng.uniform(-2, 2)
    for x in (0.2 * w + jitter, 0.8 * w + jitter):
        d.ellipse([x - wheel_r, bottom - wheel_r, x + wheel_r, bottom + wheel_r], fill=_WHEELS)
    return np.asarray(img)


def _texture(ident: _Identity, shape: tuple[int, int]) -> np.ndarray:
    """Bool [H, W]: where the textured part shows the accent colour, in sprite coordinates."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    p = ident.period
    if ident.pattern == "hstripes":
        return (yy // p) % 2 == 1
    if ident.pattern == "vstripes":
        return (xx // p) % 2 == 1
    if ident.pattern == "checker":
        return ((yy // p) + (xx // p)) % 2 == 1
    if ident.pattern == "diagonal":
        return ((yy + xx) // p) % 3 == 0
    return np.zeros(shape, dtype=bool)


# ----------------------------------------------------------------------------- rendering


@dataclass
class _Camera:
    gain: float
    cast: np.ndarray  # [3] colour cast of the RGB sensor
    flip: bool  # which way objects face in this camera
    sky: np.ndarray  # [3] background colour at the top
    ground: np.ndarray  # [3] background colour at the bottom
    ni_gain: float
    ti_ambient: float


def _make_camera(rng: np.random.Generator, index: int) -> _Camera:
    return _Camera(
        gain=rng.uniform(0.7, 1.2),
        cast=1.0 + rng.uniform(-0.15, 0.15, 3),
        flip=index % 2 == 1,
        sky=_colour(rng, sat=(0.0, 0.5), val=(0.3, 0.9)),
        ground=_colour(rng, sat=(0.0, 0.5), val=(0.2, 0.7)),
        ni_gain=rng.uniform(0.8, 1.15),
        ti_ambient=rng.uniform(0.12, 0.3),
    )


_IRONBOW = np.array(
    [[0.0, 0.0, 0.0, 0.05], [0.25, 0.3, 0.0, 0.55], [0.5, 0.85, 0.1, 0.35], [0.7, 0.98, 0.45, 0.05], [0.88, 1.0, 0.8, 0.1], [1.0, 1.0, 1.0, 0.9]]
)


def _heat_colours(temp: np.ndarray) -> np.ndarray:
    """Pseudo-colour a temperature map in [0, 1] with an iron-bow palette: [H, W] -> [H, W, 3]."""
    t = np.clip(temp, 0.0, 1.0)
    return np.stack([np.interp(t, _IRONBOW[:, 0], _IRONBOW[:, c]) for c in (1, 2, 3)], axis=-1)


def _resize(arr: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    """Resize a float [H, W] or [H, W, C] array to (H, W) through PIL float images."""
    h, w = size
    if arr.ndim == 2:
        return np.asarray(Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32)).resize((w, h), resample))
    return np.stack([_resize(arr[..., c], size, resample) for c in range(arr.shape[-1])], axis=-1)


def _background(cam: _Camera, size: tuple[int, int], rng: np.random.Generator):
    """RGB, NI and temperature backgrounds sharing the same random clutter shapes."""
    h, w = size
    # float32 throughout: rendering speed matters for 100-identity datasets on a laptop.
    ramp = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    rgb = (cam.sky * (1 - ramp) + cam.ground * ramp).astype(np.float32).repeat(w, axis=1)
    ni = np.broadcast_to(0.45 + 0.1 * (ramp[..., 0] - 0.5), (h, w)).copy()
    temp = np.broadcast_to(cam.ti_ambient + 0.05 * ramp[..., 0], (h, w)).astype(np.float32)
    clutter = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(clutter)
    n = int(rng.integers(3, 9))
    for i in range(1, n + 1):
        x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
        x1, y1 = x0 + rng.uniform(0.1, 0.6) * w, y0 + rng.uniform(0.05, 0.4) * h
        (d.ellipse if rng.random() < 0.5 else d.rectangle)([x0, y0, x1, y1], fill=i)
    ids = np.asarray(clutter)
    rgb_lut = np.array([_colour(rng) for _ in range(n + 1)])
    ni_lut = rng.uniform(0.3, 0.6, n + 1)
    # A few lukewarm objects (parked engines, lamps) keep the heat image from being trivial.
    ti_lut = cam.ti_ambient + rng.uniform(-0.05, 0.3, n + 1)
    shown = ids > 0
    rgb[shown] = rgb_lut[ids[shown]]
    ni[shown] = ni_lut[ids[shown]]
    temp[shown] = ti_lut[ids[shown]]
    return rgb, ni, temp


def _render(kind: str, ident: _Identity | None, cam: _Camera, size: tuple[int, int], rng: np.random.Generator):
    """One multi-modal view: (RGB, NI, TI) uint8 [H, W, 3] images and the bool object mask.

    ``ident`` None renders the background alone (an empty mask).
    """
    h, w = size
    rgb, ni, temp = _background(cam, size, rng)
    mask = np.zeros(size, dtype=bool)
    if ident is not None:
        parts = _draw_person(ident, rng) if kind == "person" else _draw_vehicle(ident, rng)
        textured = _TORSO if kind == "person" else _BODY
        accent = (parts == textured) & _texture(ident, parts.shape)
        sprite_rgb = ident.rgb[parts]
        sprite_rgb[accent] = ident.accent
        sprite_ni = ident.ni[parts]
        sprite_ni[accent] = ident.ni_accent
        sprite_t = ident.heat[parts]
        # Scale: persons by height, vehicles by width; the aspect of the sprite is kept.
        sh, sw = parts.shape
        scale = rng.uniform(0.72, 0.95) * (h / sh if kind == "person" else w / sw)
        th, tw = min(h, max(4, round(sh * scale))), min(w, max(4, round(sw * scale)))
        flip = cam.flip != (rng.random() < 0.15)  # a few objects face the other way
        if flip:
            parts, sprite_rgb, sprite_ni, sprite_t = (a[:, ::-1] for a in (parts, sprite_rgb, sprite_ni, sprite_t))
        obj = _resize(parts.astype(np.float32), (th, tw), Image.NEAREST) > 0
        y0, x0 = int(rng.integers(0, h - th + 1)), int(rng.integers(0, w - tw + 1))
        win = (slice(y0, y0 + th), slice(x0, x0 + tw))
        mask[win] = obj
        rgb[win][obj] = _resize(sprite_rgb, (th, tw), Image.BILINEAR)[obj]
        ni[win][obj] = _resize(sprite_ni, (th, tw), Image.BILINEAR)[obj]
        temp[win][obj] = _resize(sprite_t, (th, tw), Image.BILINEAR)[obj]
    light = cam.gain * rng.uniform(0.85, 1.15)
    rgb = rgb * (light * cam.cast).astype(np.float32) + 0.03 * rng.standard_normal(rgb.shape, dtype=np.float32)
    # NI: low contrast around mid-grey, no colour.
    ni = 0.3 + 0.4 * ni * (cam.ni_gain * rng.uniform(0.9, 1.1)) + 0.02 * rng.standard_normal(ni.shape, dtype=np.float32)
    temp = temp + 0.02 * rng.standard_normal(temp.shape, dtype=np.float32)
    temp_img = Image.fromarray(_to_uint8(temp)).filter(ImageFilter.GaussianBlur(1.0))  # thermal optics blur
    ti = _heat_colours(np.asarray(temp_img, dtype=np.float64) / 255.0)
    return _to_uint8(rgb), _to_uint8(np.repeat(ni[..., None], 3, axis=-1)), _to_uint8(ti), mask


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# ----------------------------------------------------------------------------- planning


@dataclass
class _Shot:
    pid: int
    camid: int
    sceneid: int  # MSVR310 scene; -1 elsewhere
    view: int  # index among the images of (pid, scene, camera)
    split: str  # "train", "test" (RGBNT201), "query" or "gallery"


def _plan(layout: str, ids: int, views: int, num_cams: int, rng: np.random.Generator) -> list[_Shot]:
    """Which images exist: ids split about half/half, each seen by >= 2 cameras (>= 2 scenes
    for MSVR310) so that every query has a valid gallery match under the layout's protocol."""
    order = rng.permutation(np.arange(1, ids + 1))
    train = set(order[: max(1, ids // 2)].tolist())
    shots: list[_Shot] = []
    for pid in range(1, ids + 1):
        is_train = pid in train
        if layout == "msvr310":
            # Scene ids are three digits in the file name (name[6:9]).
            pool = np.arange(1, min(999, max(4, ids // 2)) + 1)
            scenes = sorted(rng.choice(pool, 2, replace=False).tolist())
            groups = [(int(sc), sorted(rng.choice(num_cams, 2, replace=False).tolist())) for sc in scenes]
        else:
            k = int(rng.integers(2, min(num_cams, 4) + 1))
            groups = [(-1, sorted(rng.choice(num_cams, k, replace=False).tolist()))]
        pid_shots = [_Shot(pid, int(c), sc, v, "train") for sc, cams in groups for c in cams for v in range(views)]
        if not is_train:
            for shot in pid_shots:
                shot.split = "test" if layout == "rgbnt201" else "gallery"
            if layout == "msvr310":
                # One query per identity, from its first scene; its second scene stays in the gallery.
                pid_shots[0].split = "query"
            elif layout != "rgbnt201":
                # One query per camera except a random anchor camera, whose images all stay in the gallery.
                cams = groups[0][1]
                anchor = cams[int(rng.integers(len(cams)))]
                for cam in cams:
                    if cam != anchor:
                        next(s for s in pid_shots if s.camid == cam).split = "query"
        shots.extend(pid_shots)
    return shots


def _split_counts(shots: list[_Shot]) -> dict[str, dict[str, int]]:
    """Identities, images and cameras per split, as ``split_statistics`` will read them back."""
    counts: dict[str, dict[str, set | int]] = defaultdict(lambda: {"ids": set(), "images": 0, "cameras": set()})
    for shot in shots:
        for split in ("query", "gallery") if shot.split == "test" else (shot.split,):
            counts[split]["ids"].add(shot.pid)
            counts[split]["images"] += 1
            counts[split]["cameras"].add(shot.camid)
    return {
        split: {
            "ids": len(counts[split]["ids"]),
            "images": int(counts[split]["images"]),
            "cameras": len(counts[split]["cameras"]),
        }
        for split in ("train", "query", "gallery")
    }


def _split_dir(layout: str, split: str) -> str:
    dirs = get_layout(layout).splits
    return dirs["query"] if split == "test" else dirs[split]


# ----------------------------------------------------------------------------- writing


def mask_path_for(image_path: str | Path) -> Path:
    """The ground-truth mask written by ``make_synthetic`` for an image file.

    ``<root>/RGBNT201/test/NI/x.jpg`` -> ``<root>/RGBNT201_masks/test/NI/x.png``. For a strip
    layout the mask is a strip like the image (use ``load_mask`` to get one modality).
    """
    path = Path(image_path)
    folders = {layout.dataset_folder for layout in LAYOUTS.values()}
    parts = list(path.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] in folders:
            parts[i] += "_masks"
            return Path(*parts).with_suffix(".png")
    raise ValueError(f"'{image_path}' is not inside a dataset folder ({', '.join(sorted(folders))})")


def load_mask(sample: Sample, modality: str) -> np.ndarray:
    """Bool [H, W] object mask of one modality of a synthetic sample (cropped for strips)."""
    mask = np.asarray(Image.open(mask_path_for(sample.paths[modality])).convert("L")) > 127
    if sample.crop is not None:
        left, right = sample.strip_columns(modality)
        mask = mask[:, left:right]
    return mask


def _save(image: np.ndarray, path: Path, mask: np.ndarray, mask_path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, quality=_JPEG_QUALITY)
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)


def _write_view(
    spec: Layout, split_dir: Path, key: str, images: tuple[np.ndarray, ...], mask: np.ndarray
) -> None:
    """Save one rendered (RGB, NI, TI) view and its masks at a ``scan_split`` key of ``split_dir``:
    the layout's modalities only, side by side in strip order for a strip layout."""
    by_modality = dict(zip(MODALITIES, images))
    if spec.modality_dirs is None:  # one strip and a strip mask
        strip = np.concatenate([by_modality[m] for m in spec.modalities], axis=1)
        path = split_dir / key
        _save(strip, path, np.concatenate([mask] * len(spec.modalities), axis=1), mask_path_for(path))
        return
    group, _, file_name = key.rpartition("/")
    for modality in spec.modalities:
        path = split_dir / group / spec.modality_dirs[modality] / file_name
        _save(by_modality[modality], path, mask, mask_path_for(path))


def _write_market_junk(base: Path, kind: str, size: tuple[int, int], cameras: list[_Camera], seed: int) -> int:
    """Two empty-scene gallery images named like Market-1501's junk (pid ``-1``), which the
    parser must skip; returns their number."""
    spec = get_layout("market1501mm")
    for j in range(2):
        junk_rng = np.random.default_rng([seed, 4, j])
        *images, mask = _render(kind, None, cameras[j], size, junk_rng)
        _write_view(spec, base / spec.splits["gallery"], f"-1_c{j + 1}s1_{j:06d}_00.jpg", tuple(images), mask)
    return 2


def _prepare_output(out: Path, folder: str) -> tuple[Path, Path]:
    """Create (or safely replace a previous synthetic) dataset folder and its mask folder."""
    data_root, mask_root = out / folder, out / f"{folder}_masks"
    if data_root.exists():
        if not (data_root / MARKER_FILE).is_file():
            raise FileExistsError(
                f"'{data_root}' exists and was not written by make_synthetic; refusing to overwrite it "
                "(choose another --out)"
            )
        shutil.rmtree(data_root)
        shutil.rmtree(mask_root, ignore_errors=True)
    data_root.mkdir(parents=True)
    return data_root, mask_root


def make_synthetic(
    layout: str, out: str | Path, *, ids: int = 100, views: int = DEFAULT_VIEWS, seed: int = 0
) -> dict[str, Any]:
    """Write a synthetic dataset in ``layout`` under ``out`` and return a summary.

    ``ids`` identities are split about half/half into train and test; every identity is seen
    by 2-4 cameras (MSVR310: 2 scenes × 2 cameras) with ``views`` images each. Query images
    come from the test identities such that each has a gallery match under the layout's
    protocol; Market1501-MM additionally gets two ``-1`` junk images in the gallery, which
    the parser skips. The same ``seed`` gives the same files. A previous synthetic tree at the
    same place is replaced; any other existing dataset folder raises FileExistsError.

    Returns a JSON-serialisable dict: layout, root, dataset_dir, mask_root, ids, views, seed,
    image_size ([H, W] of one modality), junk_images, and per split (train/query/gallery) the
    numbers of identities, images (multi-modal samples) and cameras.
    """
    spec = get_layout(layout)
    kind, size, num_cams, max_pid = _GEOMETRY[layout]
    # Two identities at least: half of them train, half test, and each half needs one.
    if not 2 <= ids <= max_pid:
        raise SyntheticArgumentError(f"make_synthetic: ids must be in [2, {max_pid}] for {layout}, got {ids}")
    if views < 1:
        raise SyntheticArgumentError(f"make_synthetic: views must be >= 1, got {views}")
    if seed < 0:  # NumPy's generators take no negative seed
        raise SyntheticArgumentError(f"make_synthetic: seed must be >= 0, got {seed}")
    out = Path(out)
    data_root, mask_root = _prepare_output(out, spec.dataset_folder)
    base = out / spec.folder

    # Every identity, camera and image draws from its own seeded generator, so the files do not
    # depend on the order in which they are written.
    shots = _plan(layout, ids, views, num_cams, np.random.default_rng(seed))
    cameras = [_make_camera(np.random.default_rng([seed, 1, c]), c) for c in range(num_cams)]
    pids = {shot.pid for shot in shots}
    identities = {pid: _make_identity(kind, np.random.default_rng([seed, 2, pid])) for pid in pids}
    for shot in shots:
        image_rng = np.random.default_rng([seed, 3, shot.pid, shot.camid, shot.sceneid + 1, shot.view])
        *images, mask = _render(kind, identities[shot.pid], cameras[shot.camid], size, image_rng)
        key = spec.image_key(shot.pid, shot.camid, shot.sceneid, shot.view)
        _write_view(spec, base / _split_dir(layout, shot.split), key, tuple(images), mask)
    junk = _write_market_junk(base, kind, size, cameras, seed) if layout == "market1501mm" else 0

    summary = {
        "layout": layout,
        "root": str(out),
        "dataset_dir": str(data_root),
        "mask_root": str(mask_root),
        "ids": ids,
        "views": views,
        "seed": seed,
        "image_size": list(size),
        "junk_images": junk,
        "splits": _split_counts(shots),
    }
    (data_root / MARKER_FILE).write_text(json.dumps(summary, indent=2))
    return summary
