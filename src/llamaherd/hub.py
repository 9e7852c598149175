"""Hugging Face hub downloads, with a clear message when the hub cannot be reached."""

from __future__ import annotations

from pathlib import Path

from llamaherd.errors import HerdError

WEIGHT_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]


class OfflineError(HerdError):
    pass


def download(repo_id: str, local_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """Download a model repo (config, safetensors, tokenizer) and return its local directory."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            repo_id, revision=revision, local_dir=local_dir, allow_patterns=WEIGHT_PATTERNS
        )
    except Exception as e:  # the hub client raises many kinds: connection, offline mode, auth
        kind = type(e).__name__
        raise OfflineError(
            f"offline: cannot download {repo_id!r} from the Hugging Face hub ({kind}); "
            "pass a local path instead (a directory with config.json + safetensors, a Meta "
            "consolidated.*.pth directory, or a .gguf file)"
        ) from None
    return Path(path)
