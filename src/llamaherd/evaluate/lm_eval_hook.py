"""Make `lm_eval --model llamaherd` work from the shell.

lm-eval 0.4 looks model types up in its own registry and has no plugin entry points. A one-line `.pth`
file in site-packages imports this module when Python starts; it adds a finder that, right after
`lm_eval.models` fills the registry, registers "llamaherd" as a lazy placeholder for
`llamaherd.evaluate.lm_eval_adapter:LlamaherdLM`. It imports neither torch nor lm-eval itself, so
other programs pay nothing. `make setup` installs the file; by hand:

    python -m llamaherd.evaluate.lm_eval_hook install      # or: uninstall
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import sysconfig
from pathlib import Path

PTH_NAME = "llamaherd-lm-eval.pth"
# Guarded, so that uninstalling llamaherd without removing the file leaves start-up silent.
PTH_LINE = ('import importlib.util; importlib.util.find_spec("llamaherd") is not None and '
            '__import__("llamaherd.evaluate.lm_eval_hook", fromlist=["watch"]).watch()\n')
MODEL_TYPE = "llamaherd"
TARGET = "llamaherd.evaluate.lm_eval_adapter:LlamaherdLM"


def register(registry) -> None:
    if MODEL_TYPE not in registry:
        registry.register(MODEL_TYPE, target=TARGET)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds `lm_eval.models` with the other finders and registers our type once the module has run."""

    def find_spec(self, name, path, target=None):
        if name != "lm_eval.models":
            return None
        sys.meta_path.remove(self)  # once is enough, and the lookup below must not find us again
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def run_and_register(module) -> None:
            run_module(module)
            from lm_eval.api.registry import model_registry

            register(model_registry)

        spec.loader.exec_module = run_and_register  # this spec's own loader object
        return spec


def watch() -> None:
    """Called by the .pth file at start-up."""
    if "lm_eval.models" in sys.modules:  # already imported (not at start-up): register directly
        from lm_eval.api.registry import model_registry

        register(model_registry)
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args not in (["install"], ["uninstall"]):
        print("usage: python -m llamaherd.evaluate.lm_eval_hook install|uninstall", file=sys.stderr)
        return 2
    path = pth_path()
    if args == ["install"]:
        path.write_text(PTH_LINE)
        print(f"wrote {path}: `lm_eval --model {MODEL_TYPE}` now works in this environment")
    else:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
