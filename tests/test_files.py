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


def test_complete_lines_cuts_a_torn_last_line_off_the_file(tmp_path):
    from llamaherd.files import complete_lines

    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"a": 1}\n{"b": 2}\n{"c": ')  # a kill in the middle of the third append
    assert complete_lines(path) == [b'{"a": 1}', b'{"b": 2}']
    assert path.read_bytes() == b'{"a": 1}\n{"b": 2}\n'
    path.write_bytes(b"")
    assert complete_lines(path) == []
