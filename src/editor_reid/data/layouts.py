"""Dataset layouts on disk and their file-name parsing (docs/official-behaviour.md#dataset-layouts).

One parser per benchmark, each reading the directory tree and file names exactly as the
official EDITOR loaders do, so a model trained here sees the same identities and cameras (beside
each parser, its inverse ``format_name`` writes such names for the synthetic data):

========== ========================================================== ==========================
name       tree under ``root``                                        example file name
========== ========================================================== ==========================
rgbnt201   ``RGBNT201/{train_171,test}/{RGB,NI,TI}/*.jpg``            ``000012_cam3_0_02.jpg``
rgbnt100   ``RGBNT100/rgbir/{bounding_box_train,query,                ``0012_c003_000004.jpg``
           bounding_box_test}/*.jpg`` (768×128 strips R|N|T)
msvr310    ``MSVR310/{bounding_box_train,query3,bounding_box_test}/   ``0012_s004_v3_001.jpg``
           <vid>/{vis,ni,th}/*.jpg``
market1501 ``Market1501-MM/{train,query,gallery}/{RGB,NI,TI}/*.jpg``  ``0012_c3s1_000451_00.jpg``
mm
rgbn300    ``RGBN300/rgbir/{bounding_box_train,query,                 ``0012_c003_000004.jpg``
           bounding_box_test}/*.jpg`` (512×128 strips R|N, no TI)
wmveid863  ``WMVEID863/{train,query,test}/<vid>/{vis,ni,th}/*.jpg``   ``0012/v3_n1_s001.jpg``
                                                                      (pid = the folder)
========== ========================================================== ==========================

RGBN300 and WMVeID863 follow their public loaders (docs/datasets.md says which): EDITOR's
``RGBNT300.py`` reads the RGBNT100 regex under ``RGBNT300/rgbir``, while the dataset's authors'
loader (``ziwang1121/HTT`` ``datasets/rgbn300.py``) and others read ``RGBN300/rgbir``, which we
read (rename or link EDITOR's folder). WMVeID863 as ``M-c0/MCNet`` and ``wanxixi11/UGG-ReID``
``data/datasets/WMVEID863.py``: camera = the digit after the leading ``v`` (0-based, used as is),
a day/night flag ``n0``/``n1`` (parsed and checked, not kept), pid = the vehicle folder; the three
modalities are paired by file name, not by ``os.listdir`` position as some of those loaders do.

Where the official code depends on unordered ``glob``/``set`` iteration, we sort, so the
sample order and the train label of every identity (rank of its original pid) are
reproducible. Deviations that only matter for malformed data: the RGBNT100 regex is applied
to the file name rather than the whole path (a digit-bearing parent directory cannot shadow
it), ``-1`` junk identities are skipped for RGBNT100 as for Market1501-MM (the official code
would assert), and only ``*.jpg`` files are read in every layout.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from editor_reid.errors import EditorReidError
from editor_reid.modalities import MODALITIES

__all__ = [
    "Sample",
    "DatasetSplits",
    "LayoutError",
    "Layout",
    "LAYOUTS",
    "LAYOUT_NAMES",
    "DATASET_NAMES",
    "MANIFEST",
    "PROTOCOLS",
    "SPLIT_NAMES",
    "KNOWN_TRAIN_STATS",
    "STRIP_WIDTH",
    "load_dataset",
    "parse_file_name",
    "scan_split",
    "expected_paths",
    "build_splits",
    "assemble_splits",
    "get_layout",
    "dataset_dir",
    "split_dirs",
    "split_statistics",
    "format_statistics",
]

#: Width in pixels of one modality inside a strip (RGBNT100: 3 × 256 = 768 wide; RGBN300: 2 × 256).
STRIP_WIDTH = 256

#: (train identities, cameras) of the real benchmarks, for summaries without the data on disk.
KNOWN_TRAIN_STATS = {"rgbnt201": (171, 4), "rgbnt100": (50, 8), "msvr310": (155, 8), "market1501mm": (751, 6)}


class LayoutError(EditorReidError, ValueError):
    """A file name or directory does not follow the dataset's layout."""


@dataclass(frozen=True)
class Sample:
    """One multi-modal observation of an identity.

    ``paths`` maps each modality the sample has to its image file (a benchmark sample has those
    of its layout, ``Layout.modalities``; a manifest row may leave some out). For a strip
    (RGBNT100, RGBN300) every modality points at the same file, ``crop`` is the width of one
    modality's column block and ``strip`` names the blocks in column order: modality ``m`` is
    columns ``[i*crop, (i+1)*crop)`` with ``i = strip.index(m)`` (see :meth:`strip_columns`).
    A sample with a ``crop`` and no ``strip`` gets ``MODALITIES`` (R | N | T, as RGBNT100 and a
    manifest with all three modality columns). ``sceneid`` is only known for MSVR310 (-1
    elsewhere).
    """

    paths: dict[str, str]
    pid: int
    camid: int
    sceneid: int = -1
    crop: int | None = None
    strip: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.strip is not None and self.crop is None:
            raise ValueError(f"a strip {self.strip} needs a crop width")
        if self.crop is not None:
            strip = MODALITIES if self.strip is None else tuple(self.strip)
            odd = [m for m in self.paths if m not in strip]
            if odd:
                raise ValueError(f"modalities {odd} are not blocks of the strip {'|'.join(strip)}")
            object.__setattr__(self, "strip", strip)  # frozen: set once, here

    def strip_columns(self, modality: str) -> tuple[int, int]:
        """The column range ``[left, right)`` of ``modality`` in this sample's strip."""
        i = self.strip.index(modality)
        return i * self.crop, (i + 1) * self.crop


#: The parts of a benchmark, in the order ``load_dataset`` reads them.
SPLIT_NAMES = ("train", "query", "gallery")

#: The evaluation protocols: which gallery items a query may not match (same pid and camera, or
#: same pid and scene).
PROTOCOLS = ("same_camera", "same_scene")


@dataclass
class DatasetSplits:
    """The three splits of a benchmark; train pids are relabelled 0..num_train_pids-1.

    A split that was not loaded (``load_dataset(..., splits=...)``) is an empty list.
    """

    name: str
    train: list[Sample]
    query: list[Sample]
    gallery: list[Sample]
    num_train_pids: int
    num_cameras: int  # max camid + 1 over the loaded splits (sizes the SIE camera embedding)
    protocol: str  # "same_camera" | "same_scene": which gallery items a query may not match
    root: str = ""  # the directory that contains the dataset folder (a manifest's folder), for messages
    manifest: str = ""  # the manifest file the splits were read from; "" for a layout


# A parsed name: (pid, camid, sceneid), or None for a junk image the official code skips.
ParsedName = tuple[int, int, int] | None

# Each parser has a formatter beside it: the inverse, used to write synthetic data. It takes
# (pid, camid, sceneid, view) with the 0-based camid the parser returns; ``view`` numbers the
# images of one (pid, scene, camera) and only has to keep their names apart.


def _parse_rgbnt201(name: str) -> ParsedName:
    tokens = name.split("_")
    pid = int(tokens[0][0:6])
    camid = int(tokens[1][3]) - 1  # "cam3" -> 2
    return pid, camid, -1


def _format_rgbnt201(pid: int, camid: int, sceneid: int, view: int) -> str:
    return f"{pid:06d}_cam{camid + 1}_0_{view:02d}.jpg"


_RGBNT100_PATTERN = re.compile(r"([-\d]+)_c([-\d]+)")


def _parse_rgbnt100(name: str) -> ParsedName:
    match = _RGBNT100_PATTERN.search(name)
    if match is None:
        raise ValueError(f"does not match {_RGBNT100_PATTERN.pattern!r}")
    pid, camid = map(int, match.groups())
    if pid == -1:
        return None
    return pid, camid - 1, -1


def _format_rgbnt100(pid: int, camid: int, sceneid: int, view: int) -> str:
    return f"{pid:04d}_c{camid + 1:03d}_{view:06d}.jpg"


def _parse_msvr310(key: str) -> ParsedName:
    # Fixed character positions of the name (its vehicle folder is checked by check_data); the
    # camera id is already 0-based and is not decremented.
    name = key.rpartition("/")[2]
    return int(name[0:4]), int(name[11]), int(name[6:9])


def _format_msvr310(pid: int, camid: int, sceneid: int, view: int) -> str:
    return f"{pid:04d}_s{sceneid:03d}_v{camid}_{view:03d}.jpg"


def _parse_market(name: str) -> ParsedName:
    tokens = name.split("_")
    pid = int(tokens[0])
    if pid == -1:
        return None
    return pid, int(tokens[1][1]) - 1, -1  # "c3s1" -> 2


def _format_market(pid: int, camid: int, sceneid: int, view: int) -> str:
    return f"{pid:04d}_c{camid + 1}s1_{100 * (view + 1):06d}_{view:02d}.jpg"


_NIGHT_FLAG = re.compile(r"n(\d)")


def _parse_wmveid863(key: str) -> ParsedName:
    # The public loaders read the camera as name[1] / re.search("v+\d") and the flag as
    # re.search("n+\d"), and take the pid from the vehicle folder (the name carries none).
    folder, _, name = key.rpartition("/")
    if not folder.isdigit():
        raise ValueError(f"the vehicle folder '{folder}' is not a number" if folder else "no vehicle folder")
    if not (name[:1] == "v" and name[1:2].isdigit()):
        raise ValueError("the name does not start with v<camera digit>")
    night = _NIGHT_FLAG.search(name, 2)
    if night is None or night.group(1) not in "01":
        raise ValueError("no day/night flag n0 or n1 after the camera")
    return int(folder), int(name[1]), -1


def _format_wmveid863(pid: int, camid: int, sceneid: int, view: int) -> str:
    # The 3 digits after "s" number the image; MCNet reads name[7:10] of real names there.
    return f"v{camid}_n{view % 2}_s{view + 1:03d}.jpg"


@dataclass(frozen=True)
class Layout:
    """Where a benchmark's splits live and how its file names encode identity and camera."""

    name: str
    folder: str  # dataset directory relative to the root (the first part is the "dataset folder")
    splits: dict[str, str]  # split ("train", "query", "gallery") -> directory under ``folder``
    modality_dirs: dict[str, str] | None  # modality -> sub-directory; None = one strip file (see ``modalities``)
    per_identity_folders: bool  # MSVR310, WMVeID863: <split>/<vid>/<modality>/<img>
    protocol: str
    max_cameras: int  # camera ids must lie in [0, max_cameras)
    # Parses a ``scan_split`` key: the file name, or ``<vid>/<name>`` in per-identity layouts.
    parse: Callable[[str], ParsedName]
    format_name: Callable[[int, int, int, int], str]  # (pid, camid, sceneid, view) -> a name ``parse`` reads back
    example: str  # a well-formed key, quoted in error messages
    pattern: str  # human-readable description of the name format
    # The modalities every sample carries, in strip (column) order for strip layouts.
    modalities: tuple[str, ...] = MODALITIES
    # WMVeID863: the pid is the vehicle folder (any number) and the name carries none; MSVR310's
    # names carry the pid and the folder must be its 4 digits.
    pid_in_folder: bool = False

    @property
    def dataset_folder(self) -> str:
        """The top-level directory under the root (``RGBNT100`` for ``RGBNT100/rgbir``)."""
        return self.folder.split("/")[0]

    def image_key(self, pid: int, camid: int, sceneid: int, view: int) -> str:
        """Where ``format_name``'s file goes under a split's modality level, as a ``scan_split``
        key: the name, inside its 4-digit vehicle folder for per-identity layouts."""
        name = self.format_name(pid, camid, sceneid, view)
        return f"{pid:04d}/{name}" if self.per_identity_folders else name

    @property
    def strip_label(self) -> str:
        """``RGB|NI|TI`` for RGBNT100's strips: how check-data counts the files of a strip layout."""
        return "|".join(self.modalities)


_PAIRED = {m: m for m in MODALITIES}

LAYOUTS: dict[str, Layout] = {
    "rgbnt201": Layout(
        name="rgbnt201",
        folder="RGBNT201",
        splits={"train": "train_171", "query": "test", "gallery": "test"},
        modality_dirs=_PAIRED,
        per_identity_folders=False,
        protocol="same_camera",
        max_cameras=4,
        parse=_parse_rgbnt201,
        format_name=_format_rgbnt201,
        example="000012_cam3_0_02.jpg",
        pattern="<6-digit pid>_cam<1-4>_...jpg",
    ),
    "rgbnt100": Layout(
        name="rgbnt100",
        folder="RGBNT100/rgbir",
        splits={"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"},
        modality_dirs=None,
        per_identity_folders=False,
        protocol="same_camera",
        max_cameras=8,
        parse=_parse_rgbnt100,
        format_name=_format_rgbnt100,
        example="0012_c003_000004.jpg",
        pattern="<pid>_c<camera 1-8>...jpg (regex ([-\\d]+)_c([-\\d]+))",
    ),
    "msvr310": Layout(
        name="msvr310",
        folder="MSVR310",
        splits={"train": "bounding_box_train", "query": "query3", "gallery": "bounding_box_test"},
        modality_dirs={"RGB": "vis", "NI": "ni", "TI": "th"},
        per_identity_folders=True,
        protocol="same_scene",
        max_cameras=8,
        parse=_parse_msvr310,
        format_name=_format_msvr310,
        example="0012_s004_v3_001.jpg",
        pattern="name[0:4] = vehicle id, name[6:9] = scene id, name[11] = camera 0-7",
    ),
    "market1501mm": Layout(
        name="market1501mm",
        folder="Market1501-MM",
        splits={"train": "train", "query": "query", "gallery": "gallery"},
        modality_dirs=_PAIRED,
        per_identity_folders=False,
        protocol="same_camera",
        max_cameras=6,
        parse=_parse_market,
        format_name=_format_market,
        example="0012_c3s1_000451_00.jpg",
        pattern="<pid or -1>_c<camera 1-6>s<seq>_...jpg",
    ),
    "rgbn300": Layout(
        name="rgbn300",
        folder="RGBN300/rgbir",
        splits={"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"},
        modality_dirs=None,
        per_identity_folders=False,
        protocol="same_camera",
        max_cameras=8,
        parse=_parse_rgbnt100,
        format_name=_format_rgbnt100,
        example="0012_c003_000004.jpg",
        pattern="<pid>_c<camera 1-8>...jpg (regex ([-\\d]+)_c([-\\d]+))",
        modalities=("RGB", "NI"),
    ),
    "wmveid863": Layout(
        name="wmveid863",
        folder="WMVEID863",
        splits={"train": "train", "query": "query", "gallery": "test"},
        modality_dirs={"RGB": "vis", "NI": "ni", "TI": "th"},
        per_identity_folders=True,
        protocol="same_camera",
        max_cameras=8,
        parse=_parse_wmveid863,
        format_name=_format_wmveid863,
        example="0012/v3_n1_s001.jpg",
        pattern="<vehicle folder = pid>/v<camera 0-7>...n<0 day or 1 night>...jpg",
        pid_in_folder=True,
    ),
}


#: The layouts on disk, accepted wherever a layout is named (``--dataset`` of make-synthetic,
#: check-data and make-manifest).
LAYOUT_NAMES = tuple(LAYOUTS)

#: ``datasets.names`` for data listed in a CSV manifest (``datasets.manifest``; see
#: :mod:`editor_reid.data.manifest`) rather than stored in a layout.
MANIFEST = "manifest"

#: The values of ``datasets.names``: a layout, or the manifest.
DATASET_NAMES = (*LAYOUT_NAMES, MANIFEST)


def get_layout(name: str) -> Layout:
    if name == MANIFEST:
        raise LayoutError(f"'{MANIFEST}' is not a layout on disk: a manifest is read with "
                          "editor_reid.data.manifest.read_manifest (datasets.manifest)")
    try:
        return LAYOUTS[name]
    except KeyError:
        raise LayoutError(f"unknown dataset '{name}'; expected one of {', '.join(LAYOUTS)}") from None


def dataset_dir(name: str, root: str | Path) -> Path:
    """The dataset's directory under ``root`` (``root/RGBNT100/rgbir`` for rgbnt100)."""
    return Path(root).expanduser() / get_layout(name).folder


def split_dirs(name: str, root: str | Path) -> dict[str, Path]:
    """split -> directory; query and gallery are the same directory for RGBNT201."""
    base = dataset_dir(name, root)
    return {split: base / sub for split, sub in get_layout(name).splits.items()}


def parse_file_name(name: str, file_name: str) -> ParsedName:
    """Parse ``file_name`` into ``(pid, camid, sceneid)`` as the official loader.

    ``file_name`` is a ``scan_split`` key: the base name, or ``<vid>/<name>`` in per-identity
    layouts (WMVeID863 needs the folder: it is the pid; MSVR310 reads the name alone).

    Returns None for junk images (pid -1) that the official loader skips. Raises LayoutError
    naming the file and the expected format when the name cannot be parsed or yields a
    negative camera id (which would index the camera embedding from the end).
    """
    layout = get_layout(name)
    try:
        parsed = layout.parse(file_name)
    except (ValueError, IndexError) as exc:
        raise LayoutError(
            f"{name}: file name '{file_name}' does not parse ({exc}); expected {layout.pattern}, "
            f"e.g. '{layout.example}'"
        ) from None
    if parsed is not None and parsed[1] < 0:
        raise LayoutError(
            f"{name}: file name '{file_name}' gives camera id {parsed[1]} < 0; expected {layout.pattern}, "
            f"e.g. '{layout.example}'"
        )
    return parsed


def scan_split(name: str, split_dir: Path) -> dict[str, dict[str, Path]]:
    """Every image of one split directory, keyed by its name relative to the modality level.

    Returns ``key -> {modality: path}`` with only the modalities whose file exists (keys are
    ``<img>`` or, for MSVR310 and WMVeID863, ``<vid>/<img>``), sorted by key: the modalities are
    paired by file name. Strips map each of the layout's modalities to the one file. The parsers
    anchor on the RGB file (as the official code); ``check_data`` uses the full picture to find
    unpaired files.
    """
    layout = get_layout(name)
    found: dict[str, dict[str, Path]] = {}
    if layout.modality_dirs is None:
        for path in sorted(split_dir.glob("*.jpg")):
            found[path.name] = {m: path for m in layout.modalities}
        return found
    if layout.per_identity_folders:
        groups = [(d.name + "/", d) for d in sorted(p for p in split_dir.iterdir() if p.is_dir())]
    else:
        groups = [("", split_dir)]
    for prefix, group_dir in groups:
        for modality, sub in layout.modality_dirs.items():
            for path in sorted((group_dir / sub).glob("*.jpg")):
                found.setdefault(prefix + path.name, {})[modality] = path
    return dict(sorted(found.items()))


def expected_paths(name: str, split_dir: Path, key: str) -> dict[str, str]:
    """The modality paths (the layout's modalities) of a ``scan_split`` key, built from the name
    as the official code does."""
    layout = get_layout(name)
    if layout.modality_dirs is None:
        path = str(split_dir / key)
        return {m: path for m in layout.modalities}
    group, _, file_name = key.rpartition("/")
    base = split_dir / group if group else split_dir
    return {m: str(base / sub / file_name) for m, sub in layout.modality_dirs.items()}


def _read_split(
    layout: Layout, split_dir: Path, problems: list[str] | None
) -> list[tuple[int, int, int, dict[str, str]]]:
    """Parse one split; unparseable names raise, or are appended to ``problems`` when given."""
    records = []
    anchor = "RGB"
    for key, present in scan_split(layout.name, split_dir).items():
        if anchor not in present:
            continue  # no RGB anchor: invisible to the official loader; check_data reports it
        try:
            parsed = parse_file_name(layout.name, key)
        except LayoutError as exc:
            if problems is None:
                raise LayoutError(f"{exc} (file {present[anchor]})") from None
            problems.append(f"unparseable file name: {present[anchor]}: {exc}")
            continue
        if parsed is None:
            continue
        pid, camid, sceneid = parsed
        records.append((pid, camid, sceneid, expected_paths(layout.name, split_dir, key)))
    return records


def _check_dirs(layout: Layout, root: Path, splits: Sequence[str] = SPLIT_NAMES) -> dict[str, Path]:
    base = root / layout.folder
    if not base.is_dir():
        raise FileNotFoundError(
            f"{layout.name}: dataset directory '{base}' does not exist; the root '{root}' must contain "
            f"'{layout.folder}/' with {', '.join(sorted({layout.splits[s] for s in splits}))}"
        )
    dirs = {split: base / layout.splits[split] for split in splits}
    for split, path in dirs.items():
        if not path.is_dir():
            raise FileNotFoundError(f"{layout.name}: expected the {split} directory '{path}', which does not exist")
    return dirs


def _check_split_names(splits: Sequence[str]) -> tuple[str, ...]:
    unknown = [s for s in splits if s not in SPLIT_NAMES]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {SPLIT_NAMES}, got {list(splits)}")
    return tuple(s for s in SPLIT_NAMES if s in splits)


def build_splits(
    name: str,
    root: str | Path,
    *,
    problems: list[str] | None = None,
    raw_pids: bool = False,
    splits: Sequence[str] = SPLIT_NAMES,
) -> DatasetSplits:
    """Read ``splits`` (default all three; the others are left empty and their directories may be
    absent). With ``problems`` given, unparseable names are collected instead of raised.
    ``raw_pids`` keeps the original train pids (for identity-overlap checks)."""
    layout = get_layout(name)
    root = Path(root).expanduser()
    dirs = _check_dirs(layout, root, _check_split_names(splits))
    records = {split: _read_split(layout, path, problems) for split, path in dirs.items()}

    crop, strip = (STRIP_WIDTH, layout.modalities) if layout.modality_dirs is None else (None, None)

    def samples(split: str) -> list[Sample]:
        return [Sample(paths=paths, pid=pid, camid=camid, sceneid=sceneid, crop=crop, strip=strip)
                for pid, camid, sceneid, paths in records.get(split, ())]

    return assemble_splits(name, samples("train"), samples("query"), samples("gallery"), protocol=layout.protocol,
                           root=str(root), relabel=not raw_pids)


def assemble_splits(name: str, train: Sequence[Sample], query: Sequence[Sample], gallery: Sequence[Sample], *,
                    protocol: str, root: str, relabel: bool = True, **extra) -> DatasetSplits:
    """The :class:`DatasetSplits` of samples read with their original pids, for every source
    (a layout, a manifest, a check): with ``relabel`` the train pids become 0..K-1 in the sorted
    order of the original pids (as the official loaders do); query and gallery keep theirs.
    ``num_cameras`` is the largest camera id + 1 over all three. ``extra``: further fields."""
    train_pids = sorted({s.pid for s in train})
    if relabel:
        label = {pid: i for i, pid in enumerate(train_pids)}
        train = [dataclasses.replace(s, pid=label[s.pid]) for s in train]
    camids = [s.camid for s in (*train, *query, *gallery)]
    return DatasetSplits(name=name, train=list(train), query=list(query), gallery=list(gallery),
                         num_train_pids=len(train_pids), num_cameras=max(camids) + 1 if camids else 0,
                         protocol=protocol, root=root, **extra)


def load_dataset(
    name: str, root: str | Path, *, splits: Sequence[str] = SPLIT_NAMES, verbose: bool = False
) -> DatasetSplits:
    """Load a benchmark from ``root`` (the directory that CONTAINS ``RGBNT201/`` etc.).

    ``splits`` chooses what is read: ``("query", "gallery")`` evaluates without the train
    directory, which may then be absent (``train`` is empty, ``num_train_pids`` 0 and
    ``num_cameras`` counts the loaded splits). Raises FileNotFoundError naming the expected
    directory when a requested split is missing, LayoutError when the train split is requested
    but empty, and LayoutError naming the file when a name does not parse. With ``verbose`` the
    statistics table is printed, as the official loaders do.
    """
    loaded = build_splits(name, root, splits=splits)
    if "train" in splits and not loaded.train:
        raise LayoutError(f"{name}: no training images found under '{split_dirs(name, root)['train']}'")
    if verbose:
        print(format_statistics(loaded))
    return loaded


def split_statistics(splits: DatasetSplits) -> dict[str, dict[str, int]]:
    """split -> {"ids", "images", "cameras"} (distinct pids, samples, distinct camera ids)."""
    return {
        split: {
            "ids": len({s.pid for s in samples}),
            "images": len(samples),
            "cameras": len({s.camid for s in samples}),
        }
        for split, samples in (("train", splits.train), ("query", splits.query), ("gallery", splits.gallery))
    }


def format_statistics(splits: DatasetSplits) -> str:
    """A table of identities, images (multi-modal samples) and cameras per split."""
    lines = [
        f"=> {splits.name} statistics (protocol: {splits.protocol}, num_cameras: {splits.num_cameras})",
        "  ----------------------------------------",
        "  subset   | # ids | # images | # cameras",
        "  ----------------------------------------",
    ]
    for split, stats in split_statistics(splits).items():
        lines.append(f"  {split:<8} | {stats['ids']:5d} | {stats['images']:8d} | {stats['cameras']:9d}")
    lines.append("  ----------------------------------------")
    return "\n".join(lines)
