"""A content hash that names a model's exact weights, so results can be matched to the checkpoint that made them."""

from __future__ import annotations

import hashlib
from pathlib import Path

from llamaherd.errors import CheckpointError

CHUNK = 1 << 20
# Files that define the model's outputs: weights, architecture and tokenizer.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".gguf", ".model")
CONFIG_NAMES = ("config.json", "params.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "generation_config.json")
# Training state saved beside the weights does not change the model.
TRAINING_STATE = ("training_args", "optimizer", "scheduler", "rng_state", "trainer_state")


def model_files(path: Path) -> list[Path]:
    """The weight and config files at the top of a checkpoint directory (or the file itself), sorted by name."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(TRAINING_STATE)
                   and (p.suffix in WEIGHT_SUFFIXES or p.name in CONFIG_NAMES or p.name.endswith(".index.json")))
    if not files:
        raise CheckpointError(f"{path}: no weight or config files to fingerprint")
    return files


def model_fingerprint(path: str | Path) -> str:
    """"sha256:<hex>" over the sorted files' names and bytes (a single file: its bytes), in 1 MiB chunks."""
    path = Path(path).expanduser()
    digest = hashlib.sha256()
    for file in model_files(path):
        if path.is_dir():
            name = file.name.encode()
            digest.update(len(name).to_bytes(8, "little") + name + file.stat().st_size.to_bytes(8, "little"))
        with file.open("rb") as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"
