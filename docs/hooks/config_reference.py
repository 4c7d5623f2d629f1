"""MkDocs hook: generate the configuration reference from ``editor_reid.config``.

``docs/configuration.md`` holds the placeholder ``<!-- config-reference -->``; at build time it
is replaced by one table per config section, listing every key with its type, default, allowed
values and description. Nothing is copied by hand, so the page cannot go stale:

* keys, types and defaults come from the dataclasses (``Config`` -> sections -> fields), through
  :func:`dataclasses.fields` and :func:`typing.get_type_hints`;
* allowed values come from the module's ``_CHOICES`` dict (names), ``_RULES`` (the range of
  every numeric key) and ``_RELATIONS`` (rules between two keys, shown next to the first);
* the description is the field's own comment in ``config.py``: the trailing ``# comment`` on
  its line and the comment line(s) directly above it (read with :mod:`tokenize`, so a ``#``
  inside a string is not a comment). Short group labels such as ``# SFTS`` are skipped.

``NOTES`` below adds documentation-side text after the source comment, for keys whose comment
is missing or terse. The build warns (and ``mkdocs build --strict`` fails) when a key has
neither a comment nor a note, when a note names a key that no longer exists, or when the
placeholder is missing.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import logging
import re
import tokenize
import typing
from typing import Any

log = logging.getLogger("mkdocs.hooks.config_reference")

PLACEHOLDER = "<!-- config-reference -->"
PAGE = "configuration.md"

# Documentation-side text, appended after the source comment (or standing alone where the
# source has none). Keep it about meaning and links; defaults, types and choices are generated.
NOTES: dict[str, str] = {
    "model.name": "Kept so that official config files load; only EDITOR is built.",
    "model.transformer_type": (
        "Architecture of the shared backbone; `deit_base_patch16_224` (built as the ViT-B, as in the "
        "official factory) and `deit_small_patch16_224` are accepted too. See [Backbone](model.md#backbone)."
    ),
    "model.pretrain_choice": "Kind of file in `model.pretrain_path`; see [Pretrained weights](model.md#pretrained-weights).",
    "model.pretrain_path": "Read only when the model is built with `pretrained=True` (training does).",
    "model.depth": "Number of backbone blocks (0 = architecture default).",
    "model.num_heads": "Attention heads of the backbone (0 = architecture default).",
    "model.stride_size": "Patch stride; only `[16, 16]` is supported (anything else is an error).",
    "model.drop_path": "Stochastic-depth rate of the last backbone block, spread linearly over the depth.",
    "model.drop_out": "Dropout rate inside the backbone.",
    "model.att_drop_rate": "Attention dropout rate inside the backbone.",
    "model.sie_camera": "Add the SIE camera embedding (built only when there is more than one camera).",
    "model.sie_coe": "Scale of the SIE camera embedding.",
    "model.head_keep": "SFTS spatial selection: patches kept per attention head.",
    "model.frequency_keep": "SFTS frequency selection: patches kept.",
    "model.frequency_mode": (
        "`official`: the released code's score (bright-pixel count of the modality mean); "
        "`highpass`: high-frequency energy, as the paper describes. See [SFTS](model.md#sfts)."
    ),
    "model.sfts_ties": (
        "Which of equal scores at SFTS's top-k cut-off are kept: `torch` as `torch.topk` (the official code; "
        "differs between CPU, CUDA and ONNX), `lower_index` the lower patch index everywhere. See "
        "[ONNX export](export.md)."
    ),
    "model.al": "See [Heads](model.md#heads).",
    "model.bcc": "Background Consistency Constraint loss on/off.",
    "model.ocfr": "Object-Centric Feature Refinement loss on/off.",
    "model.ocfr_momentum": "EMA weight of the new batch mean in the OCFR centre update.",
    "model.ocfr_weight": "Weight of the OCFR loss.",
    "model.bcc_weight": "Weight of the BCC loss.",
    "model.id_loss_weight": "Weight of every ID (cross-entropy) term.",
    "model.triplet_loss_weight": "Weight of every triplet term.",
    "model.if_labelsmooth": "Label smoothing of the ID loss on/off (off = plain cross-entropy).",
    "model.label_smooth_eps": "Label-smoothing epsilon.",
    "model.triplet_scope": "See [Multi-GPU](multi-gpu.md).",
    "model.ocfr_scope": "`local` is the official per-GPU behaviour. See [Multi-GPU](multi-gpu.md).",
    "model.sync_bn": "No effect in one process.",
    "model.compile": "On CPU a notice is logged and the eager model is kept.",
    "model.grad_checkpointing": (
        "Activation checkpointing in training: each backbone block and each HMA block keeps only its "
        "input and is recomputed in the backward pass (the gradients are those of the plain model). "
        "Less memory per step, more time; see [Performance](performance.md#memory)."
    ),
    "model.lean_mlp": (
        "In training, every MLP (backbone and HMA, where it is fc1 -> exact GELU -> fc2 without dropout) keeps "
        "its GELU input but not its output for the backward pass and recomputes the GELU there: the same "
        "outputs and gradients (to float rounding), less memory per step; `false` runs the plain MLP. "
        "See [Performance](performance.md#what-a-training-step-holds)."
    ),
    "input.size_train": "Training input size in pixels; multiples of 16, equal to `input.size_test`.",
    "input.size_test": "Test input size [H, W]; must equal `input.size_train` (the patch grid is fixed when the model is built).",
    "input.prob": "Probability of the training horizontal flip.",
    "input.re_prob": "Probability of the training random erasing (pixel mode).",
    "input.padding": "Zero padding before the training random crop, in pixels.",
    "input.pixel_mean": "Per-channel mean used to normalise every modality.",
    "input.pixel_std": "Per-channel standard deviation used to normalise every modality.",
    "input.aug_mode": "See [Transforms](datasets.md#transforms).",
    "datasets.names": (
        "Which layout to read under `datasets.root_dir`, or `manifest`: the samples listed in the CSV file "
        "`datasets.manifest`; see [Datasets](datasets.md)."
    ),
    "datasets.root_dir": "The directory that contains the dataset folder (e.g. `RGBNT201/`).",
    "datasets.manifest": "See [Your own data: the manifest](datasets.md#your-own-data-the-manifest).",
    "datasets.protocol": (
        "The evaluation protocol ([Testing](testing.md#protocols)); the manifest's own is its `protocol` "
        "column, else `same_camera`."
    ),
    "datasets.skip_bad_images": (
        "Replace an undecodable image by the next readable image of the same identity, with a "
        "warning, instead of stopping. See [Bad images](datasets.md#bad-images)."
    ),
    "datasets.modalities": (
        "The model's modalities: 1 to 8 upper-case names (`RGB`, `NI`, `TI`, or one's own such as "
        "`DEPTH`), put in the model's order (RGB, NI, TI first). HMA has one block per modality and "
        "the feature is M·D wide ([Any set of modalities](modalities.md)); a modality a sample lacks "
        "is fed as a zero image after normalisation."
    ),
    "dataloader.sampler": "Kept so that official config files load; training always uses the P×K identity sampler.",
    "dataloader.num_instance": "K: images per identity in a training batch (`solver.ims_per_batch` must be a multiple).",
    "dataloader.num_workers": "DataLoader worker processes.",
    "solver.optimizer_name": "See [Optimiser and schedule](model.md#optimiser-and-schedule).",
    "solver.max_epochs": "Length of the cosine schedule and of the run, in epochs.",
    "solver.base_lr": "Learning rate of the weight group.",
    "solver.bias_lr_factor": "Parameters whose name contains \"bias\" train at `base_lr` times this.",
    "solver.momentum": "SGD momentum (no Nesterov).",
    "solver.weight_decay": "Weight decay of every non-bias parameter, norms and embeddings included.",
    "solver.weight_decay_bias": "Weight decay of the bias parameters.",
    "solver.ims_per_batch": "The global training batch, P×K images (triplets); split over ranks under DDP.",
    "solver.warmup_iters": "Length of the linear LR warmup.",
    "solver.warmup_factor": "Warmup starts at `base_lr` times this.",
    "solver.margin": "Triplet margin, used only when `model.no_margin` is false.",
    "solver.seed": "Seeds Python, NumPy, torch and the P×K sampler.",
    "solver.amp": (
        "`fp16` is CUDA only (with a GradScaler); `bf16` works on CUDA and CPU (on a CPU without "
        "AVX512-BF16/AMX it is emulated and slow: one warning says so); `auto` picks bf16 where the "
        "device computes it natively, else fp32 on CPU and fp16 on an old GPU."
    ),
    "solver.checkpoint_period": "Write `checkpoints/epoch_<n>.pt` every N epochs (0 = never).",
    "solver.log_period": "Write a `train` record to `metrics.jsonl` every N steps.",
    "solver.eval_period": "Evaluate every N epochs (the last epoch is always evaluated).",
    "solver.eta_min_factor": "The LR of the last epoch.",
    "solver.max_steps_per_epoch": "Leave at 0 for real training.",
    "solver.checkpoint_steps": "Lets a run killed mid-epoch resume right after the saved step.",
    "solver.deterministic": "Ask for deterministic CUDA kernels (needed for exact resume on CUDA).",
    "test.ims_per_batch": "Batch size of feature extraction.",
    "test.re_ranking": "k-reciprocal re-ranking (also `editor-reid test --rerank`).",
    "test.rerank_k1": "k1 of the k-reciprocal re-ranking.",
    "test.rerank_k2": "k2 of the k-reciprocal re-ranking.",
    "test.rerank_lambda": "Weight of the original distance in the re-ranked distance.",
    "test.feat_norm": "L2-normalise the features before computing distances (official protocol).",
    "test.distance": "`euclidean` is the squared Euclidean distance, as in the official evaluator.",
    "test.weight": "Kept so that official config files load; `editor-reid test` takes the checkpoint from `--weights`.",
    "test.max_rank": "Length of the CMC curve.",
    "output_dir": "The run directory; see [Training](training.md#the-run-directory).",
}

_LABEL = re.compile(r"^[A-Za-z][\w/+-]*(?: [\w/+-]+){0,1}$")  # "SFTS", "HMA", "Losses"
_QUOTED = re.compile(r'"([^"\n]+)"')


def _comments(cls: type) -> dict[str, tuple[str, str]]:
    """Field name -> (comment lines directly above it, trailing comment on its line)."""
    source = inspect.getsource(cls)
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    body_indent: int | None = None
    above: list[str] = []
    result: dict[str, tuple[str, str]] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.type == tokenize.COMMENT and (i + 1 < len(tokens) and tokens[i + 1].type == tokenize.NL):
            above.append(tok.string.lstrip("#").strip())
            i += 2
            continue
        if tok.type == tokenize.NL:  # a blank line ends a comment block
            above = []
            i += 1
            continue
        if tok.type == tokenize.INDENT and body_indent is None:
            body_indent = len(tok.string)
        if (
            tok.type == tokenize.NAME
            and body_indent is not None
            and tok.start[1] == body_indent
            and i + 1 < len(tokens)
            and tokens[i + 1].string == ":"
        ):
            name = tok.string
            trailing = ""
            j = i
            while j < len(tokens) and tokens[j].type not in (tokenize.NEWLINE, tokenize.ENDMARKER):
                if tokens[j].type == tokenize.COMMENT:
                    trailing = tokens[j].string.lstrip("#").strip()
                j += 1
            lead = " ".join(above)
            if len(above) == 1 and _LABEL.match(lead):
                lead = ""
            result[name] = (lead, trailing)
            above = []
            i = j + 1
            continue
        if tok.type not in (tokenize.INDENT, tokenize.DEDENT):
            above = []
        i += 1
    return result


def _sentence(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    first = text.split(" ", 1)[0].rstrip(",;:")
    if first.isalpha() and first.islower():  # leave code-like starts ("torch.compile") alone
        text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _strip_choices(text: str, choices: tuple[str, ...] | None) -> str:
    """Drop a leading ``"a" | "b":`` enumeration that the "choices / range" column already shows."""
    if not choices or not text:
        return text
    head, sep, rest = text.partition(":")
    names = [n.strip().strip('"') for n in head.split("|")]
    if len(names) > 1 and set(names) <= set(choices):
        return rest.strip() if sep else ""
    return text


def _markdown(text: str) -> str:
    text = _QUOTED.sub(r"`\1`", text)
    return text.replace("|", "\\|")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is not None:
        return str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", str(annotation))


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    return repr(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _allowed(config_module) -> dict[str, str]:  # noqa: ANN001 (a module)
    """Key -> its "choices / range" cell: the names it takes, or its range and the rules tying it to other keys."""
    cells: dict[str, list[str]] = {}
    for key, names in getattr(config_module, "_CHOICES", {}).items():
        cells.setdefault(key, []).append(", ".join(f"`{c}`" if c else '`""`' for c in names))
    for key, bound in getattr(config_module, "_RULES", {}).items():
        cells.setdefault(key, []).append(bound.text())
    for rule in getattr(config_module, "_RELATIONS", ()):
        cells.setdefault(rule.first, []).append(f"{rule.phrase} `{rule.second}`")
    return {key: "; ".join(parts) for key, parts in cells.items()}


def _rows(cls: type, prefix: str, choices: dict[str, tuple[str, ...]], allowed: dict[str, str], used: set[str]):
    hints = typing.get_type_hints(cls)
    comments = _comments(cls)
    scalars, sections = [], []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            sections.append((key, annotation))
            continue
        default = _default(f)
        lead, trailing = comments.get(f.name, ("", ""))
        trailing = _strip_choices(trailing, choices.get(key))
        if trailing.startswith("or ") and isinstance(default, str):  # "or x, y": alternatives to the default
            trailing = f'"{default}" {trailing}'
        comment = trailing or lead  # the comment on the line itself is the more specific one
        note = NOTES.get(key, "")
        if note:
            used.add(key)
        description = " ".join(p for p in (_markdown(_sentence(comment)), note) if p)
        if not description:
            log.warning("config reference: key '%s' has no comment in config.py and no note in %s", key, __file__)
        scalars.append(
            (
                f"`{key}`",
                f"`{_type_name(annotation)}`",
                "required" if default is dataclasses.MISSING else f"`{_literal(default)}`",
                _markdown(allowed.get(key, "")),
                description,
            )
        )
    return scalars, sections


def _table(rows: list[tuple[str, ...]]) -> str:
    lines = ["| key | type | default | choices / range | description |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_reference() -> str:
    """The generated Markdown: a table of top-level keys, then one table per section."""
    from editor_reid import config as config_module

    choices: dict[str, tuple[str, ...]] = dict(getattr(config_module, "_CHOICES", {}))
    allowed = _allowed(config_module)
    used: set[str] = set()
    out: list[str] = []

    top, sections = _rows(config_module.Config, "", choices, allowed, used)
    total = len(top)
    if top:
        out += ["### Top level", "", _table(top), ""]
    while sections:
        key, cls = sections.pop(0)
        rows, nested = _rows(cls, f"{key}.", choices, allowed, used)
        sections[:0] = nested
        total += len(rows)
        doc = inspect.getdoc(cls) or ""
        doc = "" if doc.startswith(f"{cls.__name__}(") else doc  # dataclasses' generated signature
        out += [f"### `{key}`", ""]
        if doc:
            out += [_markdown(doc), ""]
        out += [f"Class `editor_reid.config.{cls.__name__}`.", "", _table(rows), ""]
    for stale in sorted(set(NOTES) - used):
        log.warning("config reference: NOTES names '%s', which is not a config key any more", stale)
    out.insert(0, f"{total} keys, generated from `editor_reid.config` when this site was built.\n")
    return "\n".join(out)


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ANN001 (MkDocs hook)
    if page.file.src_uri != PAGE:
        return markdown
    if PLACEHOLDER not in markdown:
        log.warning("config reference: placeholder %s not found in %s", PLACEHOLDER, PAGE)
        return markdown
    return markdown.replace(PLACEHOLDER, render_reference())
