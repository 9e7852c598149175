"""YAML recipes: which curation stages run, in which order, with which parameters.

Built-in recipes ship as package data (recipes/*.yaml): `refinedweb`, the default, and `fineweb` (FineWeb-style
MinHash). A recipe FILE.yaml is read over a base (its `base:` key, refinedweb unless it says otherwise): each stage
or dedup phase set to `false` is switched off, a mapping changes the named parameters and keeps the others. Any
mistake (unreadable file, unknown key, stage or parameter, a value a stage refuses) is a one-line InputError naming
the file, the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from llamaherd.errors import InputError

BUILTIN = ("refinedweb", "fineweb")
SECTIONS = ("base", "read", "stages", "dedup")
READ_KEYS = {"html_files_per_shard": int}
DEDUP_PHASES = ("exact", "fuzzy", "substring")


def _stage_classes() -> dict[str, type]:
    from llamaherd.curate.stages import STAGES

    return STAGES


def _dedup_parameters(phase: str) -> list[str]:
    """Parameter names a dedup phase accepts (fuzzy: MinHashParams' fields; substring: its function's keywords)."""
    if phase == "fuzzy":
        from llamaherd.curate.minhash import MinHashParams

        return [f.name for f in dataclasses.fields(MinHashParams)]
    if phase == "substring":
        from llamaherd.curate.substring import SUBSTRING_PARAMETERS

        return list(SUBSTRING_PARAMETERS)
    return []


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe: the enabled per-document stages in order and the enabled dedup phases, each with its
    parameters (only those the recipe sets; the rest take the stage's defaults)."""

    name: str
    stages: dict[str, dict[str, Any]]
    dedup: dict[str, dict[str, Any]]
    html_files_per_shard: int = 100

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for run.json (a rerun must use the same recipe) and for sending to workers."""
        return {"name": self.name, "stages": self.stages, "dedup": self.dedup,
                "read": {"html_files_per_shard": self.html_files_per_shard}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return cls(data["name"], data["stages"], data["dedup"], data["read"]["html_files_per_shard"])

    def build_stages(self) -> list:
        """The per-document stages, built with the recipe's parameters, in order."""
        classes = _stage_classes()
        return [classes[name].from_params(params) for name, params in self.stages.items()]

    def minhash(self):
        """The fuzzy phase's MinHashParams, None when fuzzy dedup is off."""
        from llamaherd.curate.minhash import MinHashParams

        return None if "fuzzy" not in self.dedup else MinHashParams(**self.dedup["fuzzy"])

    def with_languages(self, languages: list[str]) -> Recipe:
        """The recipe with the language stage's targets replaced (`--language`); InputError if the stage is off."""
        if "language" not in self.stages:
            raise InputError(f"--language given but recipe {self.name!r} switches the language stage off; drop "
                             "--language or enable `stages: language` in the recipe")
        stages = copy.deepcopy(self.stages)
        stages["language"][LANGUAGE_PARAMETER] = list(languages)
        return dataclasses.replace(self, stages=stages)


LANGUAGE_PARAMETER = "languages"


def _read_yaml(path: Path, shown: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"recipe {shown}: cannot read it ({e.strerror or e}); pass refinedweb, fineweb or a "
                         "readable FILE.yaml") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise InputError(f"recipe {shown}: not valid YAML{at}; fix the syntax (see docs/curation.md for the "
                         "format)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(f"recipe {shown}: the top level must be a mapping with keys {', '.join(SECTIONS)}")
    return data


def _mapping(value: Any, shown: str, key: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"recipe {shown}: {key} must be a mapping of parameters, true or false; got "
                         f"{type(value).__name__}")
    return value


def _check_parameters(shown: str, key: str, given: dict[str, Any], allowed: list[str]) -> None:
    for name in given:
        if name not in allowed:
            raise InputError(f"recipe {shown}: unknown parameter {key}.{name}; {key} takes "
                             f"{', '.join(allowed) or 'no parameters'}")


def _stage_parameters(cls: type) -> list[str]:
    return [p.name for p in inspect.signature(cls).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _merge_section(base: dict[str, dict[str, Any]], over: Any, shown: str, section: str,
                   allowed: dict[str, list[str]], order: list[str]) -> dict[str, dict[str, Any]]:
    """Apply a recipe's `stages:` or `dedup:` mapping over the base's enabled entries, in canonical order."""
    over = _mapping(over, shown, section)
    merged = copy.deepcopy(base)
    for name, value in over.items():
        key = f"{section}.{name}"
        if name not in allowed:
            raise InputError(f"recipe {shown}: unknown {section[:-1] if section == 'stages' else 'dedup phase'} "
                             f"{key}; choose from {', '.join(order)}")
        if value is False:
            merged.pop(name, None)
            continue
        params = {} if value is True else _mapping(value, shown, key)
        _check_parameters(shown, key, params, allowed[name])
        merged[name] = {**merged.get(name, {}), **params}
    return {name: merged[name] for name in order if name in merged}


def load_recipe(spec: str = "refinedweb", _seen: tuple[str, ...] = ()) -> Recipe:
    """The recipe named `spec` (built-in name or path to a YAML file), merged over its base and checked."""
    if spec in BUILTIN:
        path, shown = Path(str(resources.files("llamaherd.curate") / "recipes" / f"{spec}.yaml")), spec
    else:
        path, shown = Path(spec), spec
        if not path.exists():
            raise InputError(f"recipe {spec}: no such file; pass {' or '.join(BUILTIN)} or a path to a FILE.yaml")
    data = _read_yaml(path, shown)
    for key in data:
        if key not in SECTIONS:
            raise InputError(f"recipe {shown}: unknown key {key!r}; a recipe has {', '.join(SECTIONS)}")
    base_name = data.get("base")
    if base_name is not None:
        if base_name in _seen or base_name == spec:
            raise InputError(f"recipe {shown}: base {base_name!r} leads back to itself; name another base")
        base = load_recipe(str(base_name), (*_seen, spec))
    elif spec == "refinedweb":
        base = Recipe("refinedweb", {}, {})
    else:
        base = load_recipe("refinedweb", (*_seen, spec))

    classes = _stage_classes()
    stages = _merge_section(base.stages, data.get("stages"), shown, "stages",
                            {name: _stage_parameters(cls) for name, cls in classes.items()}, list(classes))
    dedup = _merge_section(base.dedup, data.get("dedup"), shown, "dedup",
                           {phase: _dedup_parameters(phase) for phase in DEDUP_PHASES}, list(DEDUP_PHASES))
    read = _mapping(data.get("read"), shown, "read")
    _check_parameters(shown, "read", read, list(READ_KEYS))
    per_shard = read.get("html_files_per_shard", base.html_files_per_shard)
    if not isinstance(per_shard, int) or isinstance(per_shard, bool) or per_shard < 1:
        raise InputError(f"recipe {shown}: read.html_files_per_shard must be an integer >= 1, got {per_shard!r}")
    name = Path(spec).stem if spec not in BUILTIN else spec
    recipe = Recipe(name, stages, dedup, per_shard)
    _check_values(recipe, shown)
    return recipe


def _check_values(recipe: Recipe, shown: str) -> None:
    """Build every stage and the MinHash parameters once, so a value they refuse fails here, naming the key."""
    classes = _stage_classes()
    for name, params in recipe.stages.items():
        try:
            classes[name].from_params(params)
        except InputError as e:
            raise InputError(f"recipe {shown}: stages.{name}: {e}") from None
    try:
        recipe.minhash()
    except (TypeError, ValueError) as e:
        raise InputError(f"recipe {shown}: dedup.fuzzy: {e}; fix the value") from None
    substring = recipe.dedup.get("substring", {})
    min_tokens, keep_first = substring.get("min_tokens", 1), substring.get("keep_first", False)
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise InputError(f"recipe {shown}: dedup.substring.min_tokens must be an integer >= 1, got {min_tokens!r}")
    if not isinstance(keep_first, bool):
        raise InputError(f"recipe {shown}: dedup.substring.keep_first must be true or false, got {keep_first!r}")
