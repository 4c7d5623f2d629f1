"""Assemble the report: read the run directory, evaluate the weights once, render the sections."""

from __future__ import annotations

import base64
import html
import io
import json
import platform
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from editor_reid import metrics
from editor_reid.config import Config, load_config
from editor_reid.data.loaders import build_test_loader
from editor_reid.data.sources import load_configured
from editor_reid.engine import checkpoint as ckpt
from editor_reid.engine.evaluate import load_weights, model_for_checkpoint
from editor_reid.engine.inference import (
    METRIC_KEYS,
    build_eval_loaders,
    evaluate_features,
    extract_features,
    summarize,
)
from editor_reid.engine.progress import Progress
from editor_reid.engine.tables import METRIC_HEADERS
from editor_reid.engine.visualize import render_token_selection, tensor_to_image
from editor_reid.modalities import modality_subsets, subset_name
from editor_reid.report import figures

__all__ = ["build_report"]

THUMB_HEIGHT = 64  # pixels of a rank-list thumbnail
RANK_LIST = 10  # gallery entries shown per query
CMC_RANKS = 50
_CORRECT, _WRONG = (40, 160, 40), (210, 40, 40)

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:70em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.85em}
.note{color:#666;font-size:.9em}.rl{margin:.4em 0}.rl img{vertical-align:middle}
"""


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(data: bytes, alt: str, mime: str = "image/png") -> str:
    return f'<img src="{_data_uri(data, mime)}" alt="{html.escape(alt)}">'


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _metrics_table(rows: Mapping[str, Mapping[str, float] | None], first: str, notes: Mapping[str, str] = {}) -> str:
    head = "".join(f"<th>{h}</th>" for h in (first, *METRIC_HEADERS)) + ("<th>note</th>" if notes else "")
    body = []
    for label, row in rows.items():
        cells = "".join(f"<td>{_pct(row[k] if row else None)}</td>" for k in METRIC_KEYS)
        note = f"<td>{html.escape(notes.get(label, ''))}</td>" if notes else ""
        body.append(f"<tr><td>{html.escape(label)}</td>{cells}{note}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
    return records


def _default_weights(run_dir: Path) -> Path:
    for name in ("last.pt", "best.pt"):
        path = run_dir / "checkpoints" / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"'{run_dir}' holds no checkpoints/last.pt or best.pt; pass the weights with --weights")


class _Evaluation:
    """The weights' features on the run's test split: full modalities, every subset, distances."""

    def __init__(self, cfg: Config, weights: Path, device: torch.device):
        self.cfg = cfg
        state = ckpt.load_checkpoint(weights, map_location="cpu")
        self.splits = load_configured(cfg.datasets, splits=("query", "gallery"))
        self.model = model_for_checkpoint(cfg, state, self.splits.num_train_pids, self.splits.num_cameras, weights)
        self.loaded = load_weights(self.model, weights, state)
        self.model.to(device).eval()
        self.device = device
        query_loader, gallery_loader = build_eval_loaders(cfg, self.splits)
        self.subsets: dict[str, dict] = {}
        full = tuple(cfg.datasets.modalities)
        for subset in modality_subsets(full):
            q = extract_features(self.model, query_loader, device, modalities=subset)
            g = q if gallery_loader is None else extract_features(self.model, gallery_loader, device,
                                                                  modalities=subset)
            if subset == full:
                self.query, self.gallery = q, g
            self.subsets[subset_name(subset)] = evaluate_features(cfg, q, g, self.splits.protocol)
        self.full_name = subset_name(full)
        self.result = self.subsets[self.full_name]
        t = cfg.test
        self.distmat = metrics.pairwise_distance(self.query.feats, self.gallery.feats, metric=t.distance,
                                                 normalize=t.feat_norm)
        self.distmat = np.asarray(self.distmat.cpu() if torch.is_tensor(self.distmat) else self.distmat)

    def _keys(self) -> tuple[np.ndarray, np.ndarray]:
        if self.splits.protocol == "same_scene":
            return self.query.sceneids, self.gallery.sceneids
        return self.query.camids, self.gallery.camids

    def _rank(self, rows: np.ndarray, cols: np.ndarray) -> dict:
        q, g = self.query, self.gallery
        ids = dict(q_pids=q.pids[rows], g_pids=g.pids[cols], q_camids=q.camids[rows], g_camids=g.camids[cols],
                   protocol=self.splits.protocol, max_rank=1)
        if self.splits.protocol == "same_scene":
            ids.update(q_sceneids=q.sceneids[rows], g_sceneids=g.sceneids[cols])
        return metrics.evaluate_rank(self.distmat[np.ix_(rows, cols)], **ids)

    def query_ap(self) -> np.ndarray:
        """AP of every query (NaN where the protocol leaves it no relevant gallery item)."""
        cols = np.arange(len(self.gallery.pids))
        out = np.full(len(self.query.pids), np.nan)
        for i in range(len(out)):
            r = self._rank(np.array([i]), cols)
            if r["num_valid_queries"]:
                out[i] = r["mAP"]
        return out

    def ranked(self, i: int) -> list[int]:
        """Gallery indices of query ``i`` by distance, without the protocol's removed items."""
        qk, gk = self._keys()
        junk = (self.gallery.pids == self.query.pids[i]) & (gk == qk[i])
        order = np.argsort(self.distmat[i], kind="stable")
        return [int(j) for j in order if not junk[j]][:RANK_LIST]

    def camera_map(self) -> tuple[list[int], list[int], dict[tuple[int, int], float | None]]:
        qc, gc = np.unique(self.query.camids), np.unique(self.gallery.camids)
        cells = {}
        for a in qc:
            rows = np.flatnonzero(self.query.camids == a)
            for b in gc:
                r = self._rank(rows, np.flatnonzero(self.gallery.camids == b))
                cells[int(a), int(b)] = r["mAP"] if r["num_valid_queries"] else None
        return [int(c) for c in qc], [int(c) for c in gc], cells


def _images(cfg: Config, samples: Sequence, model=None) -> tuple[list[dict[str, Image.Image]], list[np.ndarray]]:
    """Each sample's modalities as PIL images at the model's input size, and (with ``model``)
    its SFTS token mask."""
    images, masks = [], []
    for batch in build_test_loader(cfg, list(samples)):
        if model is not None:
            with torch.no_grad():
                device = next(model.parameters()).device
                out = model.forward_features({m: batch[m].to(device) for m in cfg.datasets.modalities},
                                             batch["camid"].to(device))
            masks.extend(out.token_mask.cpu().numpy().astype(bool))
        for i in range(len(batch["pid"])):
            images.append({m: tensor_to_image(batch[m][i], cfg.input.pixel_mean, cfg.input.pixel_std)
                           for m in cfg.datasets.modalities})
    return images, masks


def _strip(modalities: Mapping[str, Image.Image], frame: tuple[int, int, int] | None, caption: str) -> Image.Image:
    """The modalities side by side at THUMB_HEIGHT, framed, with a caption under them."""
    thumbs = []
    for im in modalities.values():
        w = max(1, round(im.width * THUMB_HEIGHT / im.height))
        thumbs.append(im.convert("RGB").resize((w, THUMB_HEIGHT), Image.BILINEAR))
    border, cap = 3, 12
    width = sum(t.width for t in thumbs) + 2 * border
    canvas = Image.new("RGB", (width, THUMB_HEIGHT + 2 * border + cap), (255, 255, 255))
    if frame is not None:
        ImageDraw.Draw(canvas).rectangle([0, 0, width - 1, THUMB_HEIGHT + 2 * border - 1], fill=frame)
    x = border
    for t in thumbs:
        canvas.paste(t, (x, border))
        x += t.width
    ImageDraw.Draw(canvas).text((2, THUMB_HEIGHT + 2 * border), caption, fill=(0, 0, 0))
    return canvas


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _ranklists(ev: _Evaluation, max_queries: int, seed: int) -> str:
    ap = ev.query_ap()
    valid = np.flatnonzero(~np.isnan(ap))
    if not len(valid):
        return "<p>No query has a relevant gallery item under the protocol.</p>"
    half = max(1, max_queries // 2)
    hardest = [int(i) for i in valid[np.argsort(ap[valid], kind="stable")][:half]]
    rest = np.setdiff1d(valid, hardest)
    rng = np.random.default_rng(seed)
    chosen = [int(i) for i in rng.choice(rest, size=min(half, len(rest)), replace=False)] if len(rest) else []
    lists = {i: ev.ranked(i) for i in hardest + chosen}
    needed_g = sorted({j for js in lists.values() for j in js})
    q_imgs, _ = _images(ev.cfg, [ev.splits.query[i] for i in lists])
    g_imgs, _ = _images(ev.cfg, [ev.splits.gallery[j] for j in needed_g])
    q_img = dict(zip(lists, q_imgs))
    g_img = dict(zip(needed_g, g_imgs))
    parts = []
    for title, group in ((f"Hardest {len(hardest)} queries (lowest AP)", hardest),
                         (f"{len(chosen)} random queries (seed {seed})", chosen)):
        parts.append(f"<h3>{html.escape(title)}</h3>")
        for i in group:
            qpid, qcam = int(ev.query.pids[i]), int(ev.query.camids[i])
            row = [_img(_jpeg(_strip(q_img[i], None, f"query {qpid} c{qcam + 1}")), f"query {i}", "image/jpeg")]
            for rank, j in enumerate(lists[i], 1):
                ok = int(ev.gallery.pids[j]) == qpid
                cap = f"{rank}: {ev.distmat[i, j]:.3g}"
                row.append(_img(_jpeg(_strip(g_img[j], _CORRECT if ok else _WRONG, cap)),
                                f"rank {rank} {'correct' if ok else 'wrong'}", "image/jpeg"))
            parts.append(f'<div class="rl"><span class="note">AP {100 * ap[i]:.1f}</span> {" ".join(row)}</div>')
    legend = ("<p class='note'>Each entry shows the modalities side by side; green frame: same identity, red: "
              "another; the caption is the rank and the distance. Items the protocol removes are not shown.</p>")
    return legend + "".join(parts)


def _tokens(ev: _Evaluation, count: int) -> str:
    samples, seen = [], set()
    for s in ev.splits.query:
        if s.pid not in seen:
            seen.add(s.pid)
            samples.append(s)
        if len(samples) == count:
            break
    images, masks = _images(ev.cfg, samples, ev.model)
    titles = [f"ID {s.pid}\ncam {s.camid + 1}\n{int(m.sum())}/{m.size}\ntokens" for s, m in zip(samples, masks)]
    with tempfile.TemporaryDirectory() as tmp:
        path = render_token_selection(images, masks, tuple(ev.model.grid_size), Path(tmp) / "tokens.png",
                                      titles=titles)
        data = path.read_bytes()
    return ("<p class='note'>SFTS's selected tokens (one mask shared by the modalities): kept patches bright with a "
            "gold outline, dropped patches dimmed.</p>" + _img(data, "token selection"))


def _cameras(ev: _Evaluation) -> str:
    qc, gc, cells = ev.camera_map()
    head = "<th>query \\ gallery</th>" + "".join(f"<th>cam {c + 1}</th>" for c in gc)
    rows = "".join(f"<tr><td>cam {a + 1}</td>" + "".join(f"<td>{_pct(cells[a, b])}</td>" for b in gc) + "</tr>"
                   for a in qc)
    return (f"<table><tr>{head}</tr>{rows}</table><p class='note'>mAP (%) of the queries of one camera against the "
            f"gallery of one camera, protocol {ev.splits.protocol}; — where the protocol leaves no relevant "
            "item.</p>")


def _metrics_section(records: list[dict], ev: _Evaluation, weights: Path) -> str:
    progress = Progress()
    for r in records:
        if r.get("kind") == "eval" and all(k in r for k in METRIC_KEYS):
            progress.record_evaluation(r["epoch"], {k: r[k] for k in METRIC_KEYS})
    summary = progress.summary("", [])
    rows, notes = {}, {}
    if summary["untrained"]:
        rows["untrained (epoch 0)"] = summary["untrained"]["metrics"]
    if summary["final"]:
        label = f"final (epoch {summary['final']['epoch']})"
        rows[label], notes[label] = summary["final"]["metrics"], "the honest figure"
    if summary["best"]:
        label = f"best (epoch {summary['best']['epoch']}, test)"
        rows[label] = summary["best"]["metrics"]
        notes[label] = "selected on the test split, as the official code reports"
    epoch = f"epoch {ev.loaded.epoch}" if ev.loaded.epoch is not None else "epoch not recorded"
    label = f"report's weights ({weights.name}, {epoch})"
    rows[label], notes[label] = summarize(ev.result), "evaluated for this report"
    return (_metrics_table(rows, "", notes) +
            f"<p class='note'>Dataset {html.escape(ev.splits.name)}: {len(ev.query.pids)} query / "
            f"{len(ev.gallery.pids)} gallery, protocol {ev.splits.protocol}, distance {ev.cfg.test.distance}"
            f"{', features L2-normalised' if ev.cfg.test.feat_norm else ''}. Values in percent.</p>")


def _training(records: list[dict]) -> str:
    epochs = [r for r in records if r.get("kind") == "epoch"]
    evals = [r for r in records if r.get("kind") == "eval" and "mAP" in r]
    if not epochs and not evals:
        return "<p>metrics.jsonl holds no epoch or evaluation records.</p>"
    return _img(figures.training_figure(epochs, evals), "training curves")


def _config(run_dir: Path) -> str:
    parts = [f"<h3>config.yaml</h3><pre>{html.escape((run_dir / 'config.yaml').read_text())}</pre>"]
    env_path = run_dir / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    argv = env.pop("argv", None)
    if env:
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in env.items())
        parts.append(f"<h3>Training environment (env.json)</h3><table>{rows}</table>")
    here = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "processor": platform.processor() or platform.machine()}
    try:
        import timm

        here["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    rows = "".join(f"<tr><td>{k}</td><td>{html.escape(str(v))}</td></tr>" for k, v in here.items())
    parts.append(f"<h3>Report environment</h3><table>{rows}</table>")
    command = " ".join(argv) if argv else "not recorded"
    parts.append(f"<h3>Command line</h3><pre>{html.escape(command)}</pre>")
    return "".join(parts)


def build_report(run_dir: str | Path, *, weights: str | Path | None = None, out: str | Path | None = None,
                 max_queries: int = 8, device: str | None = None) -> Path:
    """Write the HTML report of the run in ``run_dir`` and return its path.

    ``weights`` (default ``checkpoints/last.pt``, else ``best.pt``) are evaluated on the run's
    test split with the run's ``config.yaml``; ``out`` defaults to ``RUN_DIR/report.html``.
    ``max_queries``: rank lists shown, half the hardest queries, half chosen at random (seeded
    by ``solver.seed``).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"'{run_dir}' is not a run directory: it has no config.yaml")
    figures.require_matplotlib()
    weights = Path(weights) if weights is not None else _default_weights(run_dir)
    if not weights.is_file():
        raise FileNotFoundError(f"weights file '{weights}' does not exist")
    out = Path(out) if out is not None else run_dir / "report.html"
    cfg = load_config(run_dir / "config.yaml")
    dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    records = _read_records(run_dir)
    ev = _Evaluation(cfg, weights, dev)
    cmc = np.asarray(metrics.evaluate_features(
        ev.query.feats, ev.gallery.feats, ev.query.pids, ev.gallery.pids, ev.query.camids, ev.gallery.camids,
        metric=cfg.test.distance, normalize=cfg.test.feat_norm, protocol=ev.splits.protocol, max_rank=CMC_RANKS,
        **({"q_sceneids": ev.query.sceneids, "g_sceneids": ev.gallery.sceneids}
           if ev.splits.protocol == "same_scene" else {}))["cmc"])
    subsets = {name: summarize(r) for name, r in ev.subsets.items()}
    subsets["average"] = {k: float(np.mean([r[k] for r in subsets.values()])) for k in METRIC_KEYS}
    sections = [
        _section("metrics", "Metrics", _metrics_section(records, ev, weights)),
        _section("cmc", "CMC curve", _img(figures.cmc_figure({ev.full_name: cmc}), "CMC curve") +
                 f"<p class='note'>Rank-1 {_pct(cmc[0])}, Rank-5 {_pct(cmc[4])}, Rank-10 {_pct(cmc[9])}, "
                 f"Rank-50 {_pct(cmc[-1])} (%).</p>"),
        _section("missing", "Missing modalities",
                 _metrics_table(subsets, "modalities fed") +
                 "<p class='note'>Absent modalities are fed as zero images to both query and gallery.</p>"),
        _section("ranklists", "Rank lists", _ranklists(ev, max_queries, cfg.solver.seed)),
        _section("tokens", "Token selection", _tokens(ev, min(4, max_queries))),
        _section("cameras", "Per-camera mAP", _cameras(ev)),
        _section("training", "Training curves", _training(records)),
        _section("config", "Configuration and environment", _config(run_dir)),
    ]
    title = f"editor-reid report: {run_dir.resolve().name}"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p class='note'>Run directory {html.escape(str(run_dir))}; weights {html.escape(str(weights))}."
            "</p>\n" + "\n".join(sections) + "\n</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
