"""``check-data``: validate a dataset tree and report every problem, not just the first.

Checked: missing split/modality directories, unpaired modalities (a file without its NI/TI/RGB
twin of the same name, in every direction), files that do not decode, strips that are not as wide
as their blocks (RGBNT100: 768, RGBN300: 512), file names that do not parse (WMVeID863: also
the vehicle folder and the day/night flag), MSVR310 files filed under another vehicle's folder, camera ids
outside the benchmark's range, identities in both train and test, and queries without a valid
gallery match under the dataset's protocol (same_camera: a gallery image of the same pid from
another camera; same_scene: from another scene), and image modes with no faithful 8-bit RGB
conversion. The statistics table is appended, with the image modes and sizes seen per modality.

``preflight`` is the fast subset a run does before it starts: every file it will read exists,
is a regular file and is not empty (stat only, nothing is decoded).
"""

from __future__ import annotations

import os
import shlex
import stat
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from editor_reid.data.dataset import BadImageError, open_image, to_rgb
from editor_reid.data.layouts import (
    SPLIT_NAMES,
    STRIP_WIDTH,
    DatasetSplits,
    LayoutError,
    Sample,
    assemble_splits,
    dataset_dir,
    expected_paths,
    format_statistics,
    get_layout,
    parse_file_name,
    scan_split,
    split_dirs,
)
from editor_reid.modalities import MODALITIES, check_modalities

__all__ = ["DataReport", "check_data", "PreflightError", "preflight", "check_image", "file_problem", "format_images",
           "has_match", "STRIP_LABEL"]

#: How the files of an RGBNT100 strip (one file for all modalities) are counted per modality;
#: other strips count under their own blocks (``Layout.strip_label``, e.g. ``RGB|NI``).
STRIP_LABEL = "|".join(MODALITIES)
# Sizes listed per modality in the statistics; a real benchmark's crops can have hundreds.
_SIZES_SHOWN = 5
# Problems quoted in a PreflightError; check-data lists all of them.
_PREFLIGHT_SHOWN = 10


@dataclass
class DataReport:
    """Outcome of ``check_data``: one line per problem, each naming the path at fault."""

    name: str
    root: str
    problems: list[str] = field(default_factory=list)
    statistics: str = ""
    # modality ("RGB", "NI", "TI"; "RGB|NI|TI" or "RGB|NI" for strips) -> Counter of the image
    # modes / sizes ("WxH") of the files that decode, each file counted once.
    image_modes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    image_sizes: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))

    @property
    def ok(self) -> bool:
        return not self.problems


def check_image(path: Path, modality: str, strip_width: int | None, report: DataReport,
                strip: Sequence[str] = MODALITIES) -> None:
    """Decode one file; count its mode and size; report decoding, mode and strip-width problems.

    ``strip_width``: the width of one modality block when the file is a strip of the ``strip``
    blocks (default R|N|T), else None.
    """
    try:
        image = open_image(str(path))
    except BadImageError as exc:
        report.problems.append(f"undecodable image: {path} ({exc.reason})")
        return
    with image:
        report.image_modes[modality][image.mode] += 1
        report.image_sizes[modality][f"{image.width}x{image.height}"] += 1
        try:
            to_rgb(image, str(path))
        except BadImageError as exc:
            report.problems.append(f"unsupported image mode: {path} ({exc.reason})")
        if strip_width is not None and image.width != len(strip) * strip_width:
            report.problems.append(
                f"wrong geometry: {path} is {image.width}x{image.height} (WxH); a {'|'.join(strip)} strip of "
                f"{strip_width}-wide blocks must be {len(strip) * strip_width} wide"
            )


def _check_directory(name: str, split_dir: Path, report: DataReport) -> list[Sample]:
    """Check every file of one split directory; return the samples the loader would build."""
    layout = get_layout(name)
    problems = report.problems
    strip = layout.modality_dirs is None
    if not strip and not layout.per_identity_folders:
        for sub in layout.modality_dirs.values():
            if not (split_dir / sub).is_dir():
                problems.append(f"missing directory: {split_dir / sub}")
    if layout.per_identity_folders:
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if layout.pid_in_folder and not folder.name.isdigit():
                problems.append(f"bad vehicle folder name: {folder} (expected the vehicle id, a number)")
            elif not layout.pid_in_folder and not (len(folder.name) == 4 and folder.name.isdigit()):
                problems.append(f"bad vehicle folder name: {folder} (expected a 4-digit vehicle id)")

    samples = []
    for key, present in scan_split(name, split_dir).items():
        expected = expected_paths(name, split_dir, key)
        for modality, path in expected.items():
            if modality not in present:
                twin_of = next(iter(present.values()))
                problems.append(f"unpaired modality: {twin_of} has no {modality} twin (expected {path})")
        if strip:
            check_image(present["RGB"], layout.strip_label, STRIP_WIDTH, report, layout.modalities)
        else:
            for modality, path in sorted(present.items(), key=lambda item: item[1]):
                check_image(path, modality, None, report)

        if layout.pid_in_folder and not key.partition("/")[0].isdigit():
            continue  # its folder is reported above, once
        shown = next(iter(present.values()))
        try:
            parsed = parse_file_name(name, key)
        except LayoutError as exc:
            problems.append(f"unparseable file name: {shown}: {exc}")
            continue
        if parsed is None:
            continue  # junk image, skipped by the loader
        pid, camid, sceneid = parsed
        if not 0 <= camid < layout.max_cameras:
            problems.append(f"camera id out of range: {shown} has camera {camid}, expected 0..{layout.max_cameras - 1}")
        folder = key.partition("/")[0] if layout.per_identity_folders and not layout.pid_in_folder else None
        if folder is not None and folder.isdigit() and int(folder) != pid:
            problems.append(f"misfiled image: {shown} is in vehicle folder {folder} but its name says {pid:04d}")
        if "RGB" in present:  # the loader anchors on RGB files
            crop, order = (STRIP_WIDTH, layout.modalities) if strip else (None, None)
            samples.append(Sample(paths=expected, pid=pid, camid=camid, sceneid=sceneid, crop=crop, strip=order))
    return samples


def has_match(query: Sample, gallery_by_pid: dict[int, list[Sample]], protocol: str) -> bool:
    """Whether ``query`` has a gallery item of its pid that ``protocol`` lets it match."""
    for g in gallery_by_pid.get(query.pid, ()):
        if protocol == "same_scene":
            if g.sceneid != query.sceneid:
                return True
        elif g.camid != query.camid:
            return True
    return False


def check_data(name: str, root: str | Path) -> DataReport:
    """Validate the ``name`` dataset under ``root`` and return every problem found.

    Raises FileNotFoundError only when the dataset folder itself is absent (a wrong
    ``--root`` is a usage error); everything below it is reported as a problem.
    """
    layout = get_layout(name)
    base = dataset_dir(name, root)
    if not base.is_dir():
        raise FileNotFoundError(
            f"check-data: dataset directory '{base}' does not exist; --root must contain '{layout.folder}/'"
        )
    report = DataReport(name=name, root=str(root))
    problems = report.problems

    by_dir: dict[Path, list[Sample]] = {}
    splits: dict[str, list[Sample]] = {}
    for split, directory in split_dirs(name, root).items():
        if directory not in by_dir:
            if not directory.is_dir():
                problems.append(f"missing directory: {directory} (the {split} split)")
                by_dir[directory] = []
            else:
                by_dir[directory] = _check_directory(name, directory, report)
        splits[split] = by_dir[directory]

    for split, samples in splits.items():
        directory = split_dirs(name, root)[split]
        if directory.is_dir() and not samples:
            problems.append(f"empty split: no usable images in {directory} (the {split} split)")

    train_pids = {s.pid for s in splits["train"]}
    test_pids = {s.pid for s in splits["query"]} | {s.pid for s in splits["gallery"]}
    overlap = sorted(train_pids & test_pids)
    if overlap:
        problems.append(
            f"train/test identity overlap: {len(overlap)} identities of {split_dirs(name, root)['train']} also "
            f"appear in query/gallery: {', '.join(map(str, overlap))}"
        )

    gallery_by_pid: dict[int, list[Sample]] = {}
    for g in splits["gallery"]:
        gallery_by_pid.setdefault(g.pid, []).append(g)
    rule = "another scene" if layout.protocol == "same_scene" else "another camera"
    for q in splits["query"]:
        if not has_match(q, gallery_by_pid, layout.protocol):
            problems.append(
                f"query without gallery match: {q.paths['RGB']} (pid {q.pid}, camera {q.camid}"
                + (f", scene {q.sceneid}" if layout.protocol == "same_scene" else "")
                + f") has no gallery image of the same pid from {rule} ({layout.protocol} protocol)"
            )

    stats = assemble_splits(name, splits["train"], splits["query"], splits["gallery"], protocol=layout.protocol,
                            root=str(root), relabel=False)
    report.statistics = format_statistics(stats) + "\n" + format_images(report)
    return report


def format_images(report: DataReport) -> str:
    """The image modes and sizes per modality, most frequent first."""
    lines = ["=> image files per modality (mode: count; size WxH: count)"]
    strips = sorted(label for label in report.image_modes if label not in MODALITIES)
    for modality in (*MODALITIES, *strips):
        if modality not in report.image_modes:
            continue
        modes = ", ".join(f"{mode} {n}" for mode, n in report.image_modes[modality].most_common())
        sizes = report.image_sizes[modality].most_common()
        shown = ", ".join(f"{size} {n}" for size, n in sizes[:_SIZES_SHOWN])
        if len(sizes) > _SIZES_SHOWN:
            rest = sum(n for _, n in sizes[_SIZES_SHOWN:])
            shown += f", {len(sizes) - _SIZES_SHOWN} other sizes {rest}"
        lines.append(f"  {modality:<9} | modes: {modes} | sizes: {shown}")
    if len(lines) == 1:
        lines.append("  (no image decoded)")
    return "\n".join(lines)


class PreflightError(LayoutError):
    """Files a run would read are missing, empty or not regular files; ``problems`` lists them all."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


def file_problem(path: str) -> str | None:
    """What is wrong with ``path`` as an image to read, from one ``stat``; None when nothing."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return "missing file"
    except OSError as exc:
        return f"cannot stat ({exc.strerror})"
    if stat.S_ISDIR(info.st_mode):
        return "a directory, not a file"
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_size == 0:
        return "empty file"
    return None


def preflight(splits: DatasetSplits, parts: Sequence[str], modalities: Sequence[str]) -> None:
    """Check, before a run starts, that every file it will read is there: for each sample of
    ``parts`` ("train", "query", "gallery") and each of ``modalities`` it has, the file exists,
    is a regular file and is not empty. A sample may lack some modalities (a manifest row with
    an empty cell), but not all of ``modalities``: it would have no image to read.

    Only ``stat`` is called, each path once (an RGBNT100 strip serves all modalities, RGBNT201's
    query and gallery are the same files), so 10 000 samples take a fraction of a second;
    ``check_data`` decodes every file. Raises PreflightError with a check-data-style report.
    """
    unknown = [p for p in parts if p not in SPLIT_NAMES]
    if unknown or check_modalities(list(modalities)):
        raise ValueError(f"preflight: unknown split {unknown} or bad modalities {list(modalities)}; expected splits "
                         f"among {SPLIT_NAMES} and modality names such as {MODALITIES}")
    problems: list[str] = []
    seen: set[str] = set()
    for part in parts:
        for sample in getattr(splits, part):
            read = [m for m in modalities if m in sample.paths]
            if not read:
                files = ", ".join(f"{m} {p}" for m, p in sample.paths.items())
                problems.append(f"no image to read: the {part} sample pid {sample.pid}, camera {sample.camid} "
                                f"({files}) has none of the modalities read ({', '.join(modalities)})")
                continue
            # The layouts anchor a sample on its RGB file; the other files are its twins.
            anchor = sample.paths.get("RGB") if not splits.manifest else None
            for modality in read:
                path = sample.paths[modality]
                if path in seen:
                    continue
                seen.add(path)
                problem = file_problem(path)
                if problem is not None:
                    if anchor is None:
                        where = f" ({modality} of the {part} sample pid {sample.pid}, camera {sample.camid})"
                    else:
                        where = f" (the {modality} twin of {anchor})" if path != anchor else ""
                    problems.append(f"{problem}: {path}{where}")
    if problems:
        raise PreflightError(_preflight_message(splits, parts, problems), problems)


def _preflight_message(splits: DatasetSplits, parts: Sequence[str], problems: list[str]) -> str:
    names = list(dict.fromkeys(parts))
    joined = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    if splits.manifest:
        where = f"manifest {splits.manifest}: {len(problems)} problem(s) in the {joined} split(s)"
        check = f"--manifest {shlex.quote(splits.manifest)}"
    else:
        root = splits.root or "."
        where = f"{splits.name}: {len(problems)} problem(s) in the {joined} split(s) at {root}"
        check = f"--dataset {splits.name} --root {shlex.quote(root)}"
    lines = [
        f"{where}; run 'editor-reid check-data {check}' for a full check",
        # List items: the command line prints them under the first line (see editor_reid.cli).
        *(f"- {problem}" for problem in problems[:_PREFLIGHT_SHOWN]),
    ]
    if len(problems) > _PREFLIGHT_SHOWN:
        lines.append(f"- ... and {len(problems) - _PREFLIGHT_SHOWN} more")
    return "\n".join(lines)
