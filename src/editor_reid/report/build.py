"""Assemble the report: evaluate the weights once (:func:`~editor_reid.engine.evaluate.run_test`),
compute the numbers (:mod:`editor_reid.report.data`) and render the sections as one HTML page."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from editor_reid.config import Config, dump_config, load_config
from editor_reid.data.loaders import build_test_loader
from editor_reid.engine.acceleration import cpu_name
from editor_reid.engine.evaluate import TestRun, run_test
from editor_reid.engine.inference import METRIC_KEYS, batch_images
from editor_reid.engine.progress import Progress
from editor_reid.engine.tables import METRIC_HEADERS
from editor_reid.engine.visualize import OBJECT_PATCH_THRESHOLD, highlight_tokens, tensor_to_image
from editor_reid.errors import UsageError
from editor_reid.fileio import atomic_write
from editor_reid.report import figures
from editor_reid.report.data import ROC_FPRS, ReportData

__all__ = ["build_report", "write_report", "run_dir_of"]

log = logging.getLogger(__name__)

THUMB_HEIGHT = 64  # pixels of a rank-list thumbnail
TOKEN_SAMPLES = 4  # query samples in the token-selection picture
_CORRECT, _WRONG = (40, 160, 40), (210, 40, 40)

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:84em;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}pre{background:#f6f6f6;padding:.6em;overflow:auto;font-size:.85em}
.note{color:#666;font-size:.9em}.rl{margin:.4em 0;white-space:nowrap;overflow-x:auto}.rl img{vertical-align:middle}
summary{cursor:pointer;margin:.5em 0}
nav a{margin-right:.8em}
"""


# ----------------------------------------------------------------------------- HTML pieces


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _img(data: bytes, alt: str, mime: str = "image/png") -> str:
    return f'<img src="{_data_uri(data, mime)}" alt="{html.escape(alt)}">'


def _pct(value: float | None) -> str:
    return "—" if value is None or not np.isfinite(value) else f"{100 * value:.2f}"


def _note(text: str) -> str:
    return f"<p class='note'>{text}</p>"


def _metrics_table(rows: Mapping[str, Mapping[str, float] | None], first: str, notes: Mapping[str, str] = {}) -> str:
    head = "".join(f"<th>{h}</th>" for h in (first, *METRIC_HEADERS)) + ("<th>note</th>" if notes else "")
    body = []
    for label, row in rows.items():
        cells = "".join(f"<td>{_pct(row[k] if row else None)}</td>" for k in METRIC_KEYS)
        note = f"<td>{html.escape(notes.get(label, ''), quote=False)}</td>" if notes else ""
        body.append(f"<tr><td>{html.escape(label, quote=False)}</td>{cells}{note}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}">\n<h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _jpeg(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ----------------------------------------------------------------------------- the run directory


def _read_records(run_dir: Path | None) -> list[dict]:
    path = None if run_dir is None else run_dir / "metrics.jsonl"
    if path is None or not path.is_file():
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


def run_dir_of(weights: str | Path) -> Path | None:
    """The run directory a checkpoint belongs to (``RUN/checkpoints/x.pt`` with ``RUN/config.yaml``),
    or None (an official ``.pth``, a file copied elsewhere)."""
    parent = Path(weights).resolve().parent
    if parent.name == "checkpoints" and (parent.parent / "config.yaml").is_file():
        return parent.parent
    return None


# ----------------------------------------------------------------------------- pictures of samples


def _images(cfg: Config, samples: Sequence) -> list[dict[str, Image.Image]]:
    """Each sample's modalities as PIL images at the model's input size (the test transform)."""
    images = []
    for batch in build_test_loader(cfg, list(samples)):
        for i in range(len(batch["pid"])):
            images.append({m: tensor_to_image(batch[m][i], cfg.input.pixel_mean, cfg.input.pixel_std)
                           for m in cfg.datasets.modalities})
    return images


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


# ----------------------------------------------------------------------------- sections


def _metrics_section(records: list[dict], data: ReportData, weights: Path) -> str:
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
    loaded = data.run.loaded
    kind = {"editor-reid": "", "official": "official EDITOR checkpoint, ", "state_dict": "state dict, "}[loaded.kind]
    epoch = f"epoch {loaded.epoch}" if loaded.epoch is not None else "epoch not recorded"
    label = f"report's weights ({weights.name}, {kind}{epoch})"
    rows[label], notes[label] = data.metrics, "evaluated for this report"
    extra = "" if records else " No training records (metrics.jsonl) go with these weights, so only their own row is shown."
    t = data.cfg.test
    return (_metrics_table(rows, "", notes) +
            _note(f"Dataset {html.escape(data.splits.name)}: {len(data.query.pids)} query / {len(data.gallery.pids)} "
                  f"gallery, protocol {data.protocol}, distance {t.distance}"
                  f"{', features L2-normalised' if t.feat_norm else ''}. Values in percent.{extra}"))


def _cmc_section(data: ReportData) -> str:
    cmc = data.cmc
    return (_img(figures.cmc_figure({data.full_name: cmc}), "CMC curve") +
            _note(f"Rank-1 {_pct(cmc[0])}, Rank-5 {_pct(cmc[4])}, Rank-10 {_pct(cmc[9])}, Rank-{len(cmc)} "
                  f"{_pct(cmc[-1])} (%)."))


def _roc_section(data: ReportData) -> str:
    marks = {f: data.tpr_at(f) for f in ROC_FPRS}
    head = "".join(f"<th>TPR@FPR={f:g}</th>" for f in ROC_FPRS)
    cells = "".join(f"<td>{_pct(v)}</td>" for v in marks.values())
    if np.isnan(data.roc_fpr).any():
        return _note("The ROC needs pairs of the same and of different identities; this split lacks one kind.")
    return (_img(figures.roc_figure(data.roc_fpr, data.roc_tpr, marks), "ROC curve") +
            f"<table><tr>{head}</tr><tr>{cells}</tr></table>" +
            _note("Verification over every query-gallery pair the protocol keeps: a pair is accepted when its distance "
                  "is at most a threshold; TPR counts accepted same-identity pairs, FPR accepted different-identity "
                  "pairs (fast-reid's ROC protocol). Each TPR is that of the curve point nearest the target FPR; a "
                  f"target below 1 / {data.num_negative_pairs:,} (the different-identity pairs) cannot be measured and shows "
                  "—. Values in percent. Open-set thresholds "
                  "for deployment: <code>editor-reid calibrate</code>."))


def _subsets_section(data: ReportData) -> str:
    if len(data.subsets) == 1:
        return _note("One modality is configured: there is no subset to leave out.")
    return (_metrics_table(data.subsets, "modalities fed") +
            _note("Absent modalities are fed as zero images (after normalisation) to both query and gallery; "
                  "average: of the subsets."))


def _cross_section(data: ReportData) -> str:
    if not data.cross:
        return _note("Cross-modality retrieval needs two modalities or more.")
    return (_metrics_table(data.cross, "query->gallery") +
            _note("The queries are fed only the modalities left of the arrow, the gallery only those right of it "
                  "(the others are zero images); average: of the pairs. The same rows as "
                  "<code>editor-reid test --cross all</code>."))


def _ranklists_section(data: ReportData, max_queries: int, named: Sequence[str | int]) -> str:
    groups = data.chosen_queries(max_queries, named)
    lists = {i: data.ranked(i) for group in groups.values() for i in group}
    if not lists:
        return _note("No query has a relevant gallery item under the protocol.")
    query_ids = list(lists)
    gallery_ids = sorted({j for js in lists.values() for j in js})
    q_img = dict(zip(query_ids, _images(data.cfg, [data.splits.query[i] for i in query_ids])))
    g_img = dict(zip(gallery_ids, _images(data.cfg, [data.splits.gallery[j] for j in gallery_ids])))
    titles = {"named": f"{len(groups.get('named', []))} named queries",
              "hardest": f"Hardest {len(groups.get('hardest', []))} queries (lowest AP)",
              "random": f"{len(groups.get('random', []))} random queries (seed {data.seed})"}
    parts = []
    for key, group in groups.items():
        if not group:
            continue
        parts.append(f"<h3>{html.escape(titles[key])}</h3>")
        for i in group:
            qpid, qcam = int(data.query.pids[i]), int(data.query.camids[i])
            row = [_img(_jpeg(_strip(q_img[i], None, f"q{i}: ID {qpid} c{qcam + 1}")), f"query {i}", "image/jpeg")]
            for rank, j in enumerate(lists[i], 1):
                ok = int(data.gallery.pids[j]) == qpid
                cap = f"{rank}: {data.distmat[i, j]:.3g}"
                row.append(_img(_jpeg(_strip(g_img[j], _CORRECT if ok else _WRONG, cap)),
                                f"rank {rank} {'correct' if ok else 'wrong'}", "image/jpeg"))
            ap = data.query_ap[i]
            score = "no relevant item" if np.isnan(ap) else f"AP {100 * ap:.1f}"
            parts.append(f'<div class="rl"><span class="note">{score}</span> {" ".join(row)}</div>')
    return (_note("Each entry shows the modalities side by side; green frame: same identity, red: another; the "
                  "caption is the rank and the distance. Items the protocol removes are not shown. Name more queries "
                  "with <code>editor-reid report --query INDEX|FILE</code>.") + "".join(parts))


def _token_picture(data: ReportData) -> tuple[bytes, int]:
    """One row per sample: the kept tokens over each modality, the attention rollout of each
    modality and the frequency score, as heat maps."""
    samples, seen = [], set()
    for s in data.splits.query:
        if s.pid not in seen:
            seen.add(s.pid)
            samples.append(s)
        if len(samples) == TOKEN_SAMPLES:
            break
    cfg, model = data.cfg, data.run.model
    grid = tuple(model.grid_size)
    modalities = list(cfg.datasets.modalities)
    rows = []
    for batch in build_test_loader(cfg, samples):
        with torch.no_grad():
            maps = model.selection_maps(batch_images(batch, data.run.device), batch["camid"].to(data.run.device))
        order = [list(model.modalities).index(m) for m in modalities]
        for i in range(len(batch["pid"])):
            images = {m: tensor_to_image(batch[m][i], cfg.input.pixel_mean, cfg.input.pixel_std) for m in modalities}
            rollout = maps.rollout[order, i].float().mean(dim=1).cpu().numpy()  # [M, N]: mean over heads
            rows.append((int(batch["pid"][i]), int(batch["camid"][i]), images, maps.mask[i].cpu().numpy(), rollout,
                         maps.frequency_scores[i].cpu().numpy()))
    scale, gap, label_h, title_w = 2, 6, 16, 64
    w, h = rows[0][2][modalities[0]].size
    cw, ch = w * scale, h * scale
    columns = [f"{m} kept" for m in modalities] + [f"{m} rollout" for m in modalities] + ["frequency"]
    width = title_w + len(columns) * (cw + gap) + 2 * gap
    canvas = Image.new("RGB", (width, label_h + len(rows) * (ch + gap) + gap), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x0 = [title_w + gap + j * (cw + gap) + (gap if j >= len(modalities) else 0) for j in range(len(columns))]
    for x, name in zip(x0, columns):
        draw.text((x + 2, 2), name, fill=(0, 0, 0))
    for r, (pid, cam, images, keep, rollout, freq) in enumerate(rows):
        y = label_h + gap + r * (ch + gap)
        draw.multiline_text((4, y + ch // 2 - 12), f"ID {pid}\ncam {cam + 1}\n{int(keep.sum())}/{keep.size}",
                            fill=(0, 0, 0))
        cells = [highlight_tokens(images[m].convert("RGB"), keep, grid, scale) for m in modalities]
        cells += [figures.heat_map(rollout[k], grid, (cw, ch), images[m].resize((cw, ch)))
                  for k, m in enumerate(modalities)]
        cells.append(figures.heat_map(freq, grid, (cw, ch), images[modalities[0]].resize((cw, ch))))
        for x, cell in zip(x0, cells):
            canvas.paste(cell, (x, y))
    return _png(canvas), len(rows)


def _tokens_section(data: ReportData) -> str:
    s = data.run.model.sfts
    picture, count = _token_picture(data)
    off = "" if data.cfg.model.sfts else " SFTS is off in this model (model.sfts=false): it keeps every token; the maps show what it would select."
    return (_img(picture, "token selection and attention rollout") +
            _note(f"{count} query samples. Left: SFTS's kept tokens (one mask shared by the modalities; kept patches "
                  "bright with a gold outline, dropped ones dimmed). Middle: the attention rollout of each modality "
                  f"(the CLS row of the product of the attention maps, mean over heads), whose top {s.head_keep} "
                  f"patches per head are kept. Right: the frequency score, whose top {s.frequency_keep} patches are "
                  f"kept. Heat maps are scaled per image (bright: high).{off}"))


def _cameras_section(data: ReportData) -> str:
    qc, gc, cells = data.camera_map()
    head = "<th>query \\ gallery</th>" + "".join(f"<th>cam {c + 1}</th>" for c in gc)
    rows = "".join(f"<tr><td>cam {a + 1}</td>" + "".join(f"<td>{_pct(cells[a, b])}</td>" for b in gc) + "</tr>"
                   for a in qc)
    return (f"<table><tr>{head}</tr>{rows}</table>" +
            _note(f"mAP (%) of the queries of one camera against the gallery of one camera, protocol {data.protocol}; "
                  "— where the protocol leaves those queries no relevant item."))


def _objects_section(data: ReportData) -> str:
    share = data.object_share()
    if share is None:
        return _note("The dataset has no object masks: they exist for data written by <code>editor-reid "
                     "make-synthetic</code>, which saves each image's mask beside the data.")
    rows = (("kept tokens on the object", _pct(share.selected_on_object)),
            ("as many random tokens on the object", _pct(share.random_on_object)),
            ("object patches among all patches", _pct(share.object_patch_fraction)),
            ("tokens kept per image", f"{share.selected_per_image:.1f} of {share.patches_per_image}"),
            ("query images", str(share.images)))
    body = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in rows)
    return (f"<table>{body}</table>" +
            _note(f"Shares in percent over every query image; a patch is object when at least "
                  f"{int(100 * OBJECT_PATCH_THRESHOLD)}% of its pixels are, by the RGB mask. The random baseline draws "
                  "as many distinct patches per image (seeded)."))


def _training_section(records: list[dict]) -> str:
    epochs = [r for r in records if r.get("kind") == "epoch"]
    evals = [r for r in records if r.get("kind") == "eval" and "mAP" in r]
    if not epochs and not evals:
        return _note("No training records: these weights come without a metrics.jsonl (an official checkpoint, "
                     "or a file outside its run directory).")
    return _img(figures.training_figure(epochs, evals), "training curves")


def _embedding_section(data: ReportData) -> str:
    feats = data.gallery.feats.numpy()
    if len(feats) < 5:
        return _note("Too few gallery features for an embedding.")
    points = figures.tsne(feats, data.seed)
    return (_img(figures.embedding_figure(points, data.gallery.pids), "t-SNE of the gallery features") +
            _note(f"t-SNE (scikit-learn, PCA start, seed {data.seed}) of the full-modality gallery features, one colour "
                  "and marker per identity. Close points: similar features; identities that form tight, separate "
                  "clusters are the ones the model tells apart."))


def _config_section(cfg: Config, run_dir: Path | None) -> str:
    saved = None if run_dir is None else run_dir / "config.yaml"
    text = dump_config(cfg)
    parts = [f"<details><summary>Configuration ({len(text.splitlines())} lines)</summary><pre>{html.escape(text)}</pre>"
             "</details>"]
    env_path = None if run_dir is None else run_dir / "env.json"
    env = json.loads(env_path.read_text()) if env_path is not None and env_path.is_file() else {}
    argv = env.pop("argv", None)
    if env:
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in env.items())
        parts.append(f"<h3>Training environment (env.json)</h3><table>{rows}</table>")
    here = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "processor": cpu_name()}
    try:
        import timm

        here["timm"] = timm.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    rows = "".join(f"<tr><td>{k}</td><td>{html.escape(str(v))}</td></tr>" for k, v in here.items())
    parts.append(f"<h3>Report environment</h3><table>{rows}</table>")
    trained = " ".join(argv) if argv else "not recorded"
    parts.append(f"<h3>Training command line</h3><pre>{html.escape(trained)}</pre>")
    parts.append(f"<h3>Report command line</h3><pre>{html.escape(' '.join(sys.argv))}</pre>")
    source = f"the run's {saved}" if saved is not None and saved.is_file() else "the config given to the evaluation"
    return _note(f"Configuration: {html.escape(source)}, as the report used it.") + "".join(parts)


SECTIONS = (
    ("metrics", "Metrics"), ("cmc", "CMC curve"), ("roc", "ROC and TPR@FPR"), ("missing", "Missing modalities"),
    ("cross", "Cross-modality retrieval"), ("ranklists", "Rank lists"), ("tokens", "Token selection"),
    ("cameras", "Per-camera mAP"), ("objects", "Kept tokens on the object"), ("training", "Training curves"),
    ("embedding", "Embedding of the gallery"), ("config", "Configuration and environment"),
)


# ----------------------------------------------------------------------------- entry points


def write_report(run: TestRun, out: str | Path, *, run_dir: str | Path | None = None, max_queries: int = 8,
                 queries: Sequence[str | int] = ()) -> Path:
    """Write the HTML report of an evaluation (``run_test(..., then=...)`` hands the
    :class:`TestRun`) to ``out`` and return its path. ``run_dir``: the training run the weights
    come from (its metrics.jsonl and env.json), if any. ``max_queries`` rank lists are shown,
    half the hardest queries, half random ones (seeded by ``solver.seed``), after the
    ``queries`` named (query indices or image paths / file names)."""
    figures.require_matplotlib()
    started = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else None
    cfg = run.cfg
    data = ReportData(run, cfg.solver.seed)
    features_done = time.perf_counter()
    records = _read_records(run_dir)
    bodies = {
        "metrics": lambda: _metrics_section(records, data, run.weights),
        "cmc": lambda: _cmc_section(data),
        "roc": lambda: _roc_section(data),
        "missing": lambda: _subsets_section(data),
        "cross": lambda: _cross_section(data),
        "ranklists": lambda: _ranklists_section(data, max_queries, queries),
        "tokens": lambda: _tokens_section(data),
        "cameras": lambda: _cameras_section(data),
        "objects": lambda: _objects_section(data),
        "training": lambda: _training_section(records),
        "embedding": lambda: _embedding_section(data),
        "config": lambda: _config_section(cfg, run_dir),
    }
    sections = [_section(sid, title, bodies[sid]()) for sid, title in SECTIONS]
    seconds = time.perf_counter() - started
    name = run_dir.resolve().name if run_dir is not None else run.weights.name
    title = f"editor-reid report: {name}"
    nav = "".join(f'<a href="#{sid}">{html.escape(t)}</a>' for sid, t in SECTIONS)
    where = f"Run directory {html.escape(str(run_dir))}; weights" if run_dir is not None else "Weights"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n<h1>{html.escape(title)}</h1>\n<nav>{nav}</nav>\n"
            + _note(f"{where} {html.escape(str(run.weights))}. Built in {seconds:.1f} s on {run.device.type}, "
                    f"{features_done - started:.1f} s of it for the features and distances.")
            + "\n" + "\n".join(sections) + "\n</body></html>\n")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
    log.info("report: %s (%.1f s, %.1f MB)", out, seconds, out.stat().st_size / 1e6)
    return out


def build_report(run_dir: str | Path | None = None, *, weights: str | Path | None = None,
                 config: str | Path | Config | None = None, out: str | Path | None = None, max_queries: int = 8,
                 queries: Sequence[str | int] = (), device: str | None = None) -> Path:
    """Evaluate weights on their test split and write the HTML report; returns its path.

    With ``run_dir`` (a training run): ``weights`` default to ``checkpoints/last.pt``, else
    ``best.pt``; the config to the run's ``config.yaml``; ``out`` to ``RUN_DIR/report.html``.
    Without it (an official checkpoint, say), ``weights``, ``config`` (a file or a
    :class:`Config`) and ``out`` are needed. See :func:`write_report` for the rest.
    """
    figures.require_matplotlib()
    if run_dir is not None:
        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").is_file():
            raise FileNotFoundError(f"'{run_dir}' is not a run directory: it has no config.yaml")
        weights = Path(weights) if weights is not None else _default_weights(run_dir)
        config = run_dir / "config.yaml" if config is None else config
        out = run_dir / "report.html" if out is None else out
    elif weights is None or config is None or out is None:
        raise UsageError("a report without a run directory needs weights, config and out")
    if not Path(weights).is_file():
        raise FileNotFoundError(f"weights file '{weights}' does not exist")
    cfg = config if isinstance(config, Config) else load_config(config)
    written: list[Path] = []
    run_test(cfg, weights, device=device, quiet=True,
             then=lambda run: written.append(write_report(run, out, run_dir=run_dir, max_queries=max_queries,
                                                          queries=queries)))
    return written[0]
