"""``check-data``: validate a dataset tree and report every problem, not just the first.

Checked: missing split/modality directories, unpaired modalities (a file without its NI/TI/RGB
twin, in every direction), files that do not decode, RGBNT100 strips that are not 768 wide,
file names that do not parse, MSVR310 files filed under another vehicle's folder, camera ids
outside the benchmark's range, identities in both train and test, and queries without a valid
gallery match under the dataset's protocol (same_camera: a gallery image of the same pid from
another camera; same_scene: from another scene). The statistics table is appended.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from editor_reid.data.dataset import BadImageError, read_image
from editor_reid.data.layouts import (
    STRIP_WIDTH,
    DatasetSplits,
    LayoutError,
    Sample,
    dataset_dir,
    expected_paths,
    format_statistics,
    get_layout,
    parse_file_name,
    scan_split,
    split_dirs,
)

__all__ = ["DataReport", "check_data"]


@dataclass
class DataReport:
    """Outcome of ``check_data``: one line per problem, each naming the path at fault."""

    name: str
    root: str
    problems: list[str] = field(default_factory=list)
    statistics: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_directory(name: str, split_dir: Path, problems: list[str]) -> list[Sample]:
    """Check every file of one split directory; return the samples the loader would build."""
    layout = get_layout(name)
    if layout.modality_dirs is not None and not layout.per_identity_folders:
        for sub in layout.modality_dirs.values():
            if not (split_dir / sub).is_dir():
                problems.append(f"missing directory: {split_dir / sub}")
    if layout.per_identity_folders:
        for folder in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if not (len(folder.name) == 4 and folder.name.isdigit()):
                problems.append(f"bad vehicle folder name: {folder} (expected a 4-digit vehicle id)")

    samples = []
    for key, present in scan_split(name, split_dir).items():
        expected = expected_paths(name, split_dir, key)
        for modality, path in expected.items():
            if modality not in present:
                twin_of = next(iter(present.values()))
                problems.append(f"unpaired modality: {twin_of} has no {modality} twin (expected {path})")
        for path in sorted(set(present.values())):
            try:
                image = read_image(str(path))
            except BadImageError as exc:
                problems.append(f"undecodable image: {path} ({exc.reason})")
                continue
            if layout.modality_dirs is None and image.width != 3 * STRIP_WIDTH:
                problems.append(
                    f"wrong geometry: {path} is {image.width}x{image.height} (WxH); an RGBNT100 R|N|T strip "
                    f"must be {3 * STRIP_WIDTH} wide"
                )

        file_name = key.rpartition("/")[2]
        shown = next(iter(present.values()))
        try:
            parsed = parse_file_name(name, file_name)
        except LayoutError as exc:
            problems.append(f"unparseable file name: {shown}: {exc}")
            continue
        if parsed is None:
            continue  # junk image, skipped by the loader
        pid, camid, sceneid = parsed
        if not 0 <= camid < layout.max_cameras:
            problems.append(f"camera id out of range: {shown} has camera {camid}, expected 0..{layout.max_cameras - 1}")
        folder = key.partition("/")[0] if layout.per_identity_folders else None
        if folder is not None and folder.isdigit() and int(folder) != pid:
            problems.append(f"misfiled image: {shown} is in vehicle folder {folder} but its name says {pid:04d}")
        if "RGB" in present:  # the loader anchors on RGB files
            crop = STRIP_WIDTH if layout.modality_dirs is None else None
            samples.append(Sample(paths=expected, pid=pid, camid=camid, sceneid=sceneid, crop=crop))
    return samples


def _has_match(query: Sample, gallery_by_pid: dict[int, list[Sample]], protocol: str) -> bool:
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
                by_dir[directory] = _check_directory(name, directory, problems)
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
        if not _has_match(q, gallery_by_pid, layout.protocol):
            problems.append(
                f"query without gallery match: {q.paths['RGB']} (pid {q.pid}, camera {q.camid}"
                + (f", scene {q.sceneid}" if layout.protocol == "same_scene" else "")
                + f") has no gallery image of the same pid from {rule} ({layout.protocol} protocol)"
            )

    camids = [s.camid for samples in splits.values() for s in samples]
    stats = DatasetSplits(
        name=name,
        train=splits["train"],
        query=splits["query"],
        gallery=splits["gallery"],
        num_train_pids=len(train_pids),
        num_cameras=max(camids) + 1 if camids else 0,
        protocol=layout.protocol,
    )
    report.statistics = format_statistics(stats)
    return report
