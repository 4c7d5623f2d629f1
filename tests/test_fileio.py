"""The one atomic writer: old file kept on failure, no temporary left, umask permissions."""

import os
import stat

import numpy as np
import pytest

from editor_reid.features.store import FeatureFile, save_feature_file
from editor_reid.fileio import atomic_write, write_json_atomically


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_json_atomically(tmp_path / "a.json", {"v": 1})

    def failing(tmp):
        tmp.write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, failing)
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert os.listdir(tmp_path) == ["a.json"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_files_get_the_permissions_of_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        ff = FeatureFile(features=np.zeros((2, 3)), pid=[0, 1], camid=[0, 0], sceneid=[-1, -1],
                         split=["query", "gallery"], paths={})
        path = save_feature_file(tmp_path / "f.npz", ff)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode
