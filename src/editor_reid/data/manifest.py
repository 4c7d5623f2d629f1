"""The manifest: a CSV file that lists a dataset's samples, for data in no benchmark layout.

``datasets.names: manifest`` with ``datasets.manifest: mine.csv`` trains and tests on it like on
any layout. One row per sample; the header (line 1) names the columns, in any order:

| column | needed | value |
|---|---|---|
| `split` | yes | `train`, `query` or `gallery` |
| `pid` | yes | the identity, an integer >= 0 |
| `camid` | yes | the camera, an integer >= 0 (0-based) |
| `sceneid` | no | the scene, an integer >= 0; empty = unknown (`same_scene` needs it on query and gallery rows) |
| `RGB`, `NI`, `TI` | one or more | the image, relative to the manifest's folder or absolute; empty = the sample lacks it |
| `crop` | no | empty: a file per modality; `w`: one strip of the manifest's modality columns side by side (R\\|N\\|T; R\\|N without a TI column), the `i`-th of them = columns `[i*w, (i+1)*w)` |
| `protocol` | no | `same_camera` or `same_scene`, one value for the whole file; default `same_camera` |

A sample that lacks a modality gets what the missing-modality evaluation feeds the model: a
zero image after normalisation. With a ``crop``, every modality column names the same strip
file (RGBNT100 stores R | N | T side by side, RGBN300 R | N): its blocks are the modality
columns of the header, in RGB, NI, TI order (``Sample.strip``), whichever cells of the row are
filled.

Column names ignore case and surrounding spaces, cells surrounding spaces; other columns are
ignored (keep your own notes there). As in the layouts, train pids are relabelled 0..K-1 by
sorted pid, query and gallery keep theirs, and ``num_cameras`` is the largest camid + 1. A
manifest is explicit, so it is refused rather than guessed at: a pid of -1 (a benchmark's junk
image), a pid in train and in query/gallery, an unknown split or a row without any image.
Messages give the file's line number (the header is line 1) and the column.

:func:`read_manifest` reads one, :func:`write_manifest` writes one from ``DatasetSplits``,
:func:`make_manifest` writes that of a layout (``editor-reid make-manifest``), and
:func:`check_manifest` also opens every file (``editor-reid check-data --manifest``).
"""

from __future__ import annotations

import csv
import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from editor_reid.data.layouts import (
    MANIFEST,
    PROTOCOLS,
    SPLIT_NAMES,
    DatasetSplits,
    LayoutError,
    Sample,
    assemble_splits,
    build_splits,
    format_statistics,
    split_dirs,
)
from editor_reid.data.validate import DataReport, check_image, file_problem, format_images, has_match
from editor_reid.modalities import MODALITIES

__all__ = ["ManifestError", "COLUMNS", "read_manifest", "write_manifest", "make_manifest", "check_manifest"]

#: Every column a manifest may have, in the order ``write_manifest`` writes them.
COLUMNS = ("split", "pid", "camid", "sceneid", *MODALITIES, "crop", "protocol")
_REQUIRED = ("split", "pid", "camid")
_CANONICAL = {column.lower(): column for column in COLUMNS}
# An integer; "3.0" too, which is what pandas writes for an integer column with empty cells.
_INTEGER = re.compile(r"[+-]?[0-9]+(?:\.0*)?")
# The default protocol of a manifest without a protocol column (that of most benchmarks).
_DEFAULT_PROTOCOL = "same_camera"


class ManifestError(LayoutError):
    """A manifest is malformed. The message names the file, the line (header = line 1) and the
    column of the first problem; ``problems`` lists them all."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


@dataclass(frozen=True)
class _Row:
    line: int
    split: str
    sample: Sample  # with the pid of the file


@dataclass
class _Parsed:
    rows: list[_Row]  # the well-formed rows, in file order
    protocol: str | None  # the protocol column's value; None when there is none
    problems: list[tuple[int, str]]  # (line, message); line 0 for the file as a whole

    def sorted_problems(self) -> list[str]:
        """The problems in line order, each as check-data prints it."""
        return [text for _, text in sorted(self.problems, key=lambda item: item[0])]


def _where(line: int, column: str | None = None) -> str:
    return f"line {line}" + (f", column '{column}'" if column else "")


def _manifest_path(path: str | Path) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"manifest '{path}' is a directory; give the CSV file")
    if not path.is_file():
        raise FileNotFoundError(f"manifest '{path}' does not exist")
    return path


def _read_records(path: Path, problems: list[tuple[int, str]]) -> list[tuple[int, list[str]]]:
    """(first line, cells) of every record; an encoding or CSV error ends the list with a problem."""
    records: list[tuple[int, list[str]]] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: the BOM spreadsheets write
            reader = csv.reader(f)
            start = 1
            for cells in reader:
                records.append((start, cells))
                start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        problems.append((0, f"is not a UTF-8 text file ({exc.reason} at byte {exc.start})"))
    except csv.Error as exc:
        problems.append((start, f"{_where(start)}: not valid CSV ({exc})"))
    return records


def _integer(values: dict[str, str], column: str, line: int, problems: list[tuple[int, str]], *,
             low: int, empty: int | None = None, required: bool = True) -> int | None:
    """The cell of ``column`` as an integer >= ``low``; ``empty`` for an empty optional cell."""
    text = values.get(column, "")
    if not text and not required:
        return empty
    if not _INTEGER.fullmatch(text):
        what = "empty" if not text else f"'{text}' is not an integer"
        problems.append((line, f"{_where(line, column)}: {what}; expected an integer >= {low}"
                               + ("" if required else " or an empty cell")))
        return None
    number = int(text.partition(".")[0])
    if number < low:
        hint = " (a benchmark's junk image; leave the row out)" if column == "pid" and number == -1 else ""
        problems.append((line, f"{_where(line, column)}: {number} is below {low}{hint}"))
        return None
    return number


def _parse(path: Path, extra: Sequence[str] = ()) -> _Parsed:
    """Every well-formed row of the manifest at ``path``, and every problem with its line.
    ``extra``: modalities beyond RGB, NI, TI whose columns hold images too (``DEPTH``)."""
    extra = [m for m in extra if m not in MODALITIES]
    known = {**_CANONICAL, **{m.lower(): m for m in extra}}
    problems: list[tuple[int, str]] = []
    records = _read_records(path, problems)
    if not records:
        if not problems:
            problems.append((1, f"{_where(1)}: empty file; expected a header naming the columns split, pid, "
                                "camid and at least one of RGB, NI, TI"))
        return _Parsed([], None, problems)

    _, header = records[0]
    columns: dict[str, int] = {}
    for index, name in enumerate(header):
        column = known.get(name.strip().lower())
        if column is None:
            continue  # not ours: the user's own notes
        if column in columns:
            problems.append((1, f"{_where(1)}: column '{column}' appears twice (columns {columns[column] + 1} "
                                f"and {index + 1})"))
        else:
            columns[column] = index
    missing = [c for c in _REQUIRED if c not in columns]
    modalities = [m for m in (*MODALITIES, *extra) if m in columns]
    if not modalities:
        missing.append("one of RGB, NI, TI")
    if missing:
        problems.append((1, f"{_where(1)}: missing column(s) {', '.join(missing)}; a manifest needs split, pid, "
                            f"camid and at least one of RGB, NI, TI (the header reads: {','.join(header)})"))
    if problems:
        return _Parsed([], None, problems)

    base = str(path.parent)
    rows: list[_Row] = []
    protocol: tuple[str, int] | None = None  # (value, line of its first occurrence)
    for line, cells in records[1:]:
        if not any(cell.strip() for cell in cells):
            continue  # a blank line
        if len(cells) != len(header):
            problems.append((line, f"{_where(line)}: {len(cells)} cells, but the header has {len(header)} columns"))
            continue
        values = {column: cells[index].strip() for column, index in columns.items()}
        before = len(problems)
        split = values["split"]
        if split not in SPLIT_NAMES:
            problems.append((line, f"{_where(line, 'split')}: unknown split '{split}'; expected train, query "
                                   f"or gallery"))
        pid = _integer(values, "pid", line, problems, low=0)
        camid = _integer(values, "camid", line, problems, low=0)
        sceneid = _integer(values, "sceneid", line, problems, low=0, empty=-1, required=False)
        crop = _integer(values, "crop", line, problems, low=1, empty=None, required=False)
        cells_of = {m: values[m] for m in modalities if values[m]}
        paths = {m: os.path.normpath(os.path.join(base, cell)) for m, cell in cells_of.items()}
        if not paths:
            problems.append((line, f"{_where(line)}: no image: the {', '.join(modalities)} cell(s) are all empty"))
        if crop is not None and len(set(paths.values())) > 1:
            first, *others = paths
            odd = next(m for m in others if paths[m] != paths[first])
            problems.append((line, f"{_where(line, odd)}: '{cells_of[odd]}' is not the strip '{cells_of[first]}' of "
                                   f"column {first}; with a crop, every modality column names the same strip"))
        value = values.get("protocol", "")
        if value and value not in PROTOCOLS:
            problems.append((line, f"{_where(line, 'protocol')}: unknown protocol '{value}'; expected "
                                   f"{' or '.join(PROTOCOLS)}"))
        elif value and protocol is None:
            protocol = (value, line)
        elif value and value != protocol[0]:
            problems.append((line, f"{_where(line, 'protocol')}: '{value}' differs from '{protocol[0]}' (line "
                                   f"{protocol[1]}); the protocol is one value for the whole manifest"))
        if len(problems) == before:
            strip = tuple(modalities) if crop is not None else None
            sample = Sample(paths=paths, pid=pid, camid=camid, sceneid=sceneid, crop=crop, strip=strip)
            rows.append(_Row(line, split, sample))
    return _Parsed(rows, protocol[0] if protocol else None, problems + _overlap_problems(rows))


def _overlap_problems(rows: list[_Row]) -> list[tuple[int, str]]:
    """One problem per identity of train that query or gallery has too, at its first test row."""
    first_train: dict[int, int] = {}
    for row in rows:
        if row.split == "train":
            first_train.setdefault(row.sample.pid, row.line)
    problems, reported = [], set()
    for row in rows:
        pid = row.sample.pid
        if row.split != "train" and pid in first_train and pid not in reported:
            reported.add(pid)
            problems.append((row.line, f"{_where(row.line, 'pid')}: pid {pid} is in {row.split} and in train (line "
                                       f"{first_train[pid]}); a test identity must not be trained on"))
    return problems


def _scene_problems(rows: list[_Row], protocol: str) -> list[tuple[int, str]]:
    if protocol != "same_scene":
        return []
    return [(row.line, f"{_where(row.line, 'sceneid')}: empty, but the same_scene protocol needs the scene of "
                       f"every query and gallery row")
            for row in rows if row.split != "train" and row.sample.sceneid < 0]


def _split_names(splits: Sequence[str]) -> tuple[str, ...]:
    unknown = [s for s in splits if s not in SPLIT_NAMES]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLIT_NAMES}, got {list(splits)}")
    return tuple(s for s in SPLIT_NAMES if s in splits)


def _check_protocol(protocol: str | None) -> None:
    if protocol and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS} (or None: the manifest's own), got {protocol!r}")


def read_manifest(path: str | Path, *, splits: Sequence[str] = SPLIT_NAMES, protocol: str | None = None,
                  modalities: Sequence[str] = MODALITIES) -> DatasetSplits:
    """Read the manifest at ``path`` (relative to the current directory) as ``DatasetSplits``.

    ``splits`` chooses the splits built (the others are empty lists); every row is checked
    whatever ``splits`` says. ``protocol`` (``same_camera`` / ``same_scene``) overrides the
    manifest's ``protocol`` column; without either it is ``same_camera``. ``modalities`` (the
    config's ``datasets.modalities``): a column named after one beyond RGB, NI, TI (``DEPTH``)
    holds that modality's images; otherwise such a column is a note. Train pids are
    relabelled 0..K-1 by sorted pid; ``root`` is the manifest's folder, ``name`` "manifest".

    Raises FileNotFoundError when the file is absent, ManifestError naming the file, line and
    column of the first problem (a missing column, an unknown split, an id that does not parse,
    a row without any image, a pid in train and in query/gallery, ...), and ManifestError when a
    requested split has no row. Whether the image files exist is checked by
    :func:`~editor_reid.data.validate.preflight` (before a run) and :func:`check_manifest`.
    """
    path = _manifest_path(path)
    wanted = _split_names(splits)
    _check_protocol(protocol)
    parsed = _parse(path, modalities)
    chosen = protocol or parsed.protocol or _DEFAULT_PROTOCOL
    parsed.problems += _scene_problems(parsed.rows, chosen)
    if parsed.problems:
        problems = parsed.sorted_problems()
        first = f" {problems[0]}" if problems[0].startswith("is ") else f", {problems[0]}"  # "is not UTF-8" / "line 3"
        more = "" if len(problems) == 1 else (
            f" (and {len(problems) - 1} more problem(s); 'editor-reid check-data --manifest "
            f"{shlex.quote(str(path))}' lists them all)")
        raise ManifestError(f"manifest '{path}'{first}{more}", problems)

    samples = {split: [row.sample for row in parsed.rows if row.split == split] for split in wanted}
    for split in wanted:
        if not samples[split]:
            read = wanted[0] if len(wanted) == 1 else f"{', '.join(wanted[:-1])} and {wanted[-1]}"
            raise ManifestError(f"manifest '{path}' has no {split} row (column 'split'); this reads the {read} "
                                f"split(s)", [f"no {split} row"])
    return assemble_splits(MANIFEST, samples.get("train", []), samples.get("query", []), samples.get("gallery", []),
                           protocol=chosen, root=str(path.parent), manifest=str(path))


def _relative(path: str, base: str) -> str:
    try:
        return os.path.relpath(os.path.abspath(path), base)
    except ValueError:  # another drive (Windows): no relative path exists
        return os.path.abspath(path)


def write_manifest(splits: DatasetSplits, out: str | Path) -> Path:
    """Write the samples of ``splits`` to the CSV file ``out`` (replacing it) and return its path.

    Rows come in split order (train, query, gallery), each split in its own order, so reading
    the file back gives the same samples in the same order. pids are written as they are: give
    the original train pids (``build_splits(..., raw_pids=True)``), which read_manifest relabels
    as the layouts do. Paths are written relative to ``out``'s folder; the modality columns that
    some sample has (a strip's blocks are these columns, so RGBN300's R | N strips get no TI
    column); the ``crop`` column only when a sample has one; ``splits.protocol`` on every row.
    Raises ValueError when the strips' blocks are not those columns (strips of different kinds).
    """
    out = Path(out).expanduser()
    if out.is_dir():
        raise IsADirectoryError(f"manifest '{out}' is a directory; give a file name, e.g. {out / 'manifest.csv'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    base = os.path.abspath(out.parent)
    parts = [(split, getattr(splits, split)) for split in SPLIT_NAMES]
    everything = [s for _, samples in parts for s in samples]
    with_crop = any(s.crop is not None for s in everything)
    carried = {m for s in everything for m in s.paths}
    modalities = tuple(m for m in MODALITIES if m in carried)
    odd = next((s for s in everything if s.crop is not None and s.strip != modalities), None)
    if odd is not None:
        raise ValueError(f"manifest '{out}': the strip {'|'.join(odd.strip)} of pid {odd.pid} is not made of the "
                         f"modality columns {'|'.join(modalities)}; a manifest's strips are all of one kind")
    header = [c for c in COLUMNS if (c != "crop" or with_crop) and (c not in MODALITIES or c in modalities)]
    partial = out.with_name(f".{out.name}.partial")  # written whole, then renamed: never half a manifest
    with open(partial, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        for split, samples in parts:
            for s in samples:
                cells = {"split": split, "pid": s.pid, "camid": s.camid, "sceneid": s.sceneid if s.sceneid >= 0 else "",
                         "crop": "" if s.crop is None else s.crop, "protocol": splits.protocol}
                cells.update({m: _relative(s.paths[m], base) if m in s.paths else "" for m in MODALITIES})
                writer.writerow([cells[c] for c in header])
    os.replace(partial, out)
    return out


def make_manifest(name: str, root: str | Path, out: str | Path, *, splits: Sequence[str] = SPLIT_NAMES,
                  overwrite: bool = False) -> DatasetSplits:
    """Write the manifest of the ``name`` layout under ``root`` to ``out``; return what was written
    (original pids).

    Reading ``out`` back gives the samples, order, train labels, camera count and protocol of
    ``load_dataset(name, root, splits=splits)``. Refuses (FileExistsError) to replace an
    existing file unless ``overwrite``; the layout's own errors (a missing directory, a name that
    does not parse, an empty train split) are those of ``load_dataset``.
    """
    wanted = _split_names(splits)
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"manifest '{out}' already exists; remove it or choose another --out")
    loaded = build_splits(name, root, raw_pids=True, splits=wanted)
    if "train" in wanted and not loaded.train:
        raise LayoutError(f"{name}: no training images found under '{split_dirs(name, root)['train']}'")
    write_manifest(loaded, out)
    return loaded


def check_manifest(path: str | Path, modalities: Sequence[str] = MODALITIES) -> DataReport:
    """Check the manifest at ``path`` and every file it names; return every problem found.

    The problems of :func:`read_manifest` (each naming its line and column), then, per row, the
    image files: missing, empty or not a regular file, not decodable, in an image mode with no
    8-bit RGB conversion, a strip whose width is not its ``crop`` times its blocks; and queries
    without a gallery row that may match them under the manifest's protocol. Each file is
    opened once, however many rows name it. The report's statistics count the original pids.
    Raises FileNotFoundError only when the manifest itself is absent.
    """
    path = _manifest_path(path)
    report = DataReport(name=MANIFEST, root=str(path))
    parsed = _parse(path, modalities)
    protocol = parsed.protocol or _DEFAULT_PROTOCOL
    problems = parsed.problems + _scene_problems(parsed.rows, protocol)
    if any(line == 0 for line, _ in parsed.problems):  # not a text file: nothing else to say
        report.problems = [f"manifest '{path}' {text}" for _, text in parsed.problems]
        return report
    if not parsed.rows and not problems:
        problems.append((1, "no samples: the manifest has a header but no row"))

    checked: set[str] = set()
    for row in parsed.rows:
        sample = row.sample
        files = list(sample.paths.items())[:1] if sample.crop is not None else sample.paths.items()
        for modality, file in files:
            if file in checked:
                continue
            checked.add(file)
            where = _where(row.line, modality)
            problem = file_problem(file)
            if problem is not None:
                problems.append((row.line, f"{where}: {problem}: {file}"))
                continue
            before = len(report.problems)
            label = "|".join(sample.strip) if sample.crop is not None else modality
            check_image(Path(file), label, sample.crop, report, sample.strip or MODALITIES)
            problems += [(row.line, f"{where}: {text}") for text in report.problems[before:]]
            del report.problems[before:]

    by_split = {split: [row for row in parsed.rows if row.split == split] for split in SPLIT_NAMES}
    gallery_by_pid: dict[int, list[Sample]] = {}
    for row in by_split["gallery"]:
        gallery_by_pid.setdefault(row.sample.pid, []).append(row.sample)
    rule = "another scene" if protocol == "same_scene" else "another camera"
    for row in by_split["query"]:
        q = row.sample
        if by_split["gallery"] and not has_match(q, gallery_by_pid, protocol):
            scene = f", scene {q.sceneid}" if protocol == "same_scene" else ""
            problems.append((row.line, f"{_where(row.line)}: query without gallery match: pid {q.pid}, camera "
                                       f"{q.camid}{scene} has no gallery row of the same pid from {rule} "
                                       f"({protocol} protocol)"))
    report.problems = [text for _, text in sorted(problems, key=lambda item: item[0])]

    samples = {split: [row.sample for row in rows] for split, rows in by_split.items()}
    stats = assemble_splits(MANIFEST, samples["train"], samples["query"], samples["gallery"], protocol=protocol,
                            root=str(path.parent), relabel=False, manifest=str(path))
    report.statistics = format_statistics(stats) + "\n" + format_images(report)
    return report
