"""`lineage.json`: where a fine-tuned model came from, in the schema the leaderboard imports.

    {"schema": 1,
     "child":  {"name", "path", "fingerprint" | null},
     "parent": {"name", "path", "fingerprint"},
     "method": "full-sft" | "lora-sft" | "qlora-sft",
     "data_files": [{"path", "sha256", "synthetic"?}],
     "hyperparameters": {...}, "final_metrics": {...}, "date": ISO 8601 (UTC)}

A data file that `herd synth` wrote (a `manifest.json` of kind "llamaherd-synth" beside it whose "output" names
the file) carries "synthetic": {"recipe", "teacher": {"name", "teacher_id", "kind", "fingerprint" | "base_url"},
"manifest": absolute path, "matches_manifest": whether the sha256 trained on is the manifest's "output_sha256"},
so the leaderboard can say which teacher wrote what a model learnt from. Files without one have no "synthetic".
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamaherd.errors import CheckpointError
from llamaherd.files import atomic_write
from llamaherd.fingerprint import model_fingerprint
from llamaherd.terminal import printable

if TYPE_CHECKING:
    from llamaherd.load import Source

SCHEMA = 1
LINEAGE_FILE = "lineage.json"
SYNTH_MANIFEST = "manifest.json"
SYNTH_KIND = "llamaherd-synth"
METHODS = {"full": "full-sft", "lora": "lora-sft", "qlora": "qlora-sft"}


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def synthetic_provenance(data_path: str | Path, sha256: str) -> dict[str, Any] | None:
    """The "synthetic" record of a data file `herd synth` wrote (see the module docstring), or None when no
    llamaherd-synth manifest beside it names it.

    sha256: the file's hash as trained on. A malformed manifest warns (naming the file and the field) and gives
    None: provenance is a record, so it never stops a training run.
    """
    data_path = Path(data_path).resolve()
    manifest = data_path.parent / SYNTH_MANIFEST
    if not manifest.is_file():
        return None
    try:
        doc = json.loads(manifest.read_text(encoding="utf-8"))
    except OSError as e:
        return _no_provenance(manifest, f"cannot be read ({e.strerror})")
    except ValueError as e:  # bad JSON or bad UTF-8
        return _no_provenance(manifest, f"not valid JSON ({e})")
    if not isinstance(doc, dict) or doc.get("kind") != SYNTH_KIND:
        return None  # another tool's manifest.json
    output = doc.get("output")
    if not isinstance(output, str):
        return _no_provenance(manifest, f"field 'output' is {output!r}; expected the data file's name")
    if (manifest.parent / output).resolve() != data_path:
        return None  # it describes another file of the folder
    teacher = doc.get("teacher")
    if not isinstance(teacher, dict):
        return _no_provenance(manifest, f"field 'teacher' is {teacher!r}; expected an object")
    fields = {"recipe": doc.get("recipe"), "output_sha256": doc.get("output_sha256"),
              **{f"teacher.{k}": teacher.get(k) for k in ("name", "teacher_id", "kind")}}
    if teacher.get("kind") in ("local", "http"):
        key = "fingerprint" if teacher["kind"] == "local" else "base_url"
        fields[f"teacher.{key}"] = teacher.get(key)
    for name, value in fields.items():
        if not isinstance(value, str):
            return _no_provenance(manifest, f"field '{name}' is {value!r}; expected a string")
    return {
        "recipe": fields["recipe"],
        "teacher": {k.removeprefix("teacher."): v for k, v in fields.items() if k.startswith("teacher.")},
        "manifest": str(manifest),
        "matches_manifest": sha256 == fields["output_sha256"],
    }


def _no_provenance(manifest: Path, problem: str) -> None:
    warnings.warn(printable(f"{manifest}: {problem}; the data file is recorded in lineage.json without its "
                            "synthetic provenance"), stacklevel=3)


def build_lineage(
    child_name: str,
    child_path: Path,
    parent_name: str,
    parent_path: Path,
    method: str,
    data_files: Sequence[tuple[str | Path, str]],
    hyperparameters: dict[str, Any],
    final_metrics: dict[str, Any],
    parent_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The lineage record; the child's fingerprint is null when it has no weight files to hash.

    data_files: (path, sha256) of each file trained on, hashed once by the Trainer when training began; a file
    `herd synth` wrote also gets its `synthetic_provenance`.
    """
    try:
        child_fp: str | None = model_fingerprint(child_path)
    except CheckpointError:  # nothing to hash: recorded as null
        child_fp = None
    return {
        "schema": SCHEMA,
        "child": {"name": child_name, "path": str(Path(child_path).resolve()), "fingerprint": child_fp},
        "parent": {"name": parent_name, "path": str(Path(parent_path).resolve()),
                   "fingerprint": parent_fingerprint or model_fingerprint(parent_path)},
        "method": METHODS.get(method, method),
        "data_files": [_data_file(p, sha256) for p, sha256 in data_files],
        "hyperparameters": hyperparameters,
        "final_metrics": final_metrics,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _data_file(path: str | Path, sha256: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": str(Path(path).resolve()), "sha256": sha256}
    if (synthetic := synthetic_provenance(path, sha256)) is not None:
        entry["synthetic"] = synthetic
    return entry


def read_lineage(path: str | Path) -> dict[str, Any]:
    """A lineage.json's JSON object (the fields are checked by the leaderboard's import)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); fix or delete the lineage file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top of a lineage file")
    return data


def find_lineage(model_path: str | Path) -> Path | None:
    """The lineage.json describing a model directory: inside it, or beside it when its `child.path` is this
    directory (`herd finetune` writes RUN/lineage.json beside RUN/adapter or RUN/model)."""
    path = Path(model_path).expanduser()
    inside, beside = path / LINEAGE_FILE, path.parent / LINEAGE_FILE
    if inside.is_file():
        return inside
    if beside.is_file() and path.exists():
        child = read_lineage(beside).get("child")
        child_path = child.get("path") if isinstance(child, dict) else None
        if isinstance(child_path, str) and (beside.parent / child_path).resolve() == path.resolve():
            return beside
    return None


def model_identity(src: Source) -> dict[str, Any]:
    """A model's name, path and fingerprint; a PEFT adapter adds its base's, and a fine-tune the lineage.json of its
    run, so that whoever records or serves the model names its parent (results.json, `herd serve`'s /v1/models)."""
    identity: dict[str, Any] = {"name": src.name, "path": str(src.path), "fingerprint": model_fingerprint(src.path)}
    if src.base is not None:
        identity["base"] = {"name": src.base.name, "path": str(src.base.path),
                            "fingerprint": model_fingerprint(src.base.path)}
    if (lineage := find_lineage(src.path)) is not None:
        identity["lineage"] = read_lineage(lineage)
    return identity


def write_lineage(out_dir: Path, lineage: dict[str, Any]) -> Path:
    """Write `out_dir/lineage.json` atomically."""
    path = Path(out_dir) / LINEAGE_FILE
    return atomic_write(path, json.dumps(lineage, indent=2) + "\n")
