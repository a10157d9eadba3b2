import os
import stat

import pytest

from unip_analysis.files import atomic_write, atomic_write_text


def test_atomic_write_replaces_whole_file_with_normal_permissions(tmp_path):
    p = atomic_write_text(tmp_path / "out" / "a.json", "{}\n")
    assert p.read_text() == "{}\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = atomic_write_text(tmp_path / "a.txt", "old")

    def boom(tmp):
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]
