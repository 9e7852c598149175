"""llamaherd.files.atomic_write: a failed write leaves the old file and no temporary file behind."""

import pytest

from llamaherd.files import atomic_write


def test_atomic_write_replaces_whole_file_and_keeps_old_on_failure(tmp_path):
    target = tmp_path / "sub" / "results.json"
    assert atomic_write(target, "first\n") == target
    atomic_write(target, b"second\n")
    assert target.read_bytes() == b"second\n"

    class Boom(str):
        def encode(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, Boom("third"))
    assert target.read_text() == "second\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]
