import hashlib
import shutil

import pytest

from llamaherd.errors import CheckpointError
from llamaherd.fingerprint import model_fingerprint


def test_single_file_is_sha256_of_its_bytes(tmp_path):
    data = bytes(range(256)) * 9000  # > 2 chunks
    f = tmp_path / "m.gguf"
    f.write_bytes(data)
    assert model_fingerprint(f) == "sha256:" + hashlib.sha256(data).hexdigest()


def _checkpoint(d):
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "model.safetensors").write_bytes(b"\x00" * 5000 + b"weights")
    (d / "tokenizer.json").write_text("{}")
    return d


def test_directory_fingerprint_follows_weights_and_names_only(tmp_path):
    a = _checkpoint(tmp_path / "a")
    fp = model_fingerprint(a)
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    b = tmp_path / "b"
    shutil.copytree(a, b)
    (b / "README.md").write_text("notes")
    (b / "training_args.bin").write_bytes(b"args")
    assert model_fingerprint(b) == fp  # same model: copies, docs and training state do not count
    (b / "model.safetensors").write_bytes(b"\x00" * 5000 + b"weightz")
    assert model_fingerprint(b) != fp
    c = tmp_path / "c"
    shutil.copytree(a, c)
    (c / "model.safetensors").rename(c / "model-00001-of-00001.safetensors")
    assert model_fingerprint(c) != fp  # names are part of the hash


def test_missing_or_empty(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        model_fingerprint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no weight or config files"):
        model_fingerprint(tmp_path)
