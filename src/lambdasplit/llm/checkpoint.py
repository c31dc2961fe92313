"""Selective loading from a checkpoint's safetensors files, and the model fingerprint.

A side never materialises weights it does not run: the model skeleton is built on the
`meta` device, and only the requested sub-modules are allocated and filled from the
safetensors files (read tensor by tensor with `safe_open`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from lambdasplit.errors import LambdaSplitError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise LambdaSplitError(f"unknown dtype {name!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _DTYPES.items()}[dtype]


def _local_folder(model: str) -> Path:
    """A local folder for `model`: a path as is, `zoo:NAME` resolved, a Hub id downloaded (config + index only)."""
    from lambdasplit.zoo import resolve

    model = resolve(model)
    if os.path.isdir(model):
        return Path(model)
    try:  # A Hub id: fetch the small files now; weight shards are fetched only when needed.
        from huggingface_hub import hf_hub_download

        config_file = hf_hub_download(model, "config.json")
    except Exception as error:
        raise LambdaSplitError(f"cannot find model {model!r} locally or on the Hub: {error}") from error
    return Path(config_file).parent


class Checkpoint:
    """One model checkpoint: its config, its tensor -> file map, and its fingerprint."""

    def __init__(self, model: str):
        self.name = model
        self.folder = _local_folder(model)
        self.config = AutoConfig.from_pretrained(self.folder)
        self._weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            return json.loads(index.read_text())["weight_map"]
        single = self.folder / "model.safetensors"
        if not single.exists():
            self._fetch("model.safetensors")
        if not single.exists():
            raise LambdaSplitError(f"{self.folder} has no safetensors weights (lambdasplit reads only safetensors)")
        return {name: "model.safetensors" for name in _safetensors_header(single) if name != "__metadata__"}

    def _fetch(self, filename: str) -> None:
        if (self.folder / filename).exists():
            return
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(self.name, filename)
        except Exception:
            pass

    @property
    def fingerprint(self) -> str:
        """sha256 of the config and the checkpoint's tensor layout; the first 32 hex digits.

        Cheap, and the same on every side whatever shards it holds: a sharded checkpoint
        contributes its index (tensor name -> shard file), which every side reads; a
        single-file one the {name: [dtype, shape]} map of its safetensors header. No
        weight is read.
        """
        digest = hashlib.sha256()
        config = json.loads((self.folder / "config.json").read_text())
        for volatile in ("transformers_version", "_name_or_path", "dtype", "torch_dtype"):
            config.pop(volatile, None)
        digest.update(json.dumps(config, sort_keys=True).encode())
        if (self.folder / "model.safetensors.index.json").exists():
            layout = self._weight_map
        else:
            header = _safetensors_header(self.folder / "model.safetensors")
            header.pop("__metadata__", None)
            layout = {name: [info["dtype"], info["shape"]] for name, info in header.items()}
        digest.update(json.dumps(layout, sort_keys=True).encode())
        return digest.hexdigest()[:32]

    def has_tensor(self, name: str) -> bool:
        return name in self._weight_map

    def skeleton(self, dtype: torch.dtype = torch.float32):
        """The whole model on the meta device: structure and config, no memory.

        Built in `dtype` as `from_pretrained(dtype=...)` builds it, so every tensor gets the
        dtype transformers would give it (rotary frequencies stay float32 in a bf16 model).
        """
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(self.config, dtype=dtype)

    def load_modules(self, model, module_names: list[str], aliases: dict[str, str] | None = None):
        """Allocate the named sub-modules of a meta skeleton and fill them from the checkpoint.

        `aliases` maps a module name to the one whose weights it shares (tied LM head).
        Non-persistent buffers (rotary frequencies, embedding scales) are re-created by the
        model's own `_init_weights`, which is how transformers itself initialises them.
        """
        aliases = aliases or {}
        for module_name in module_names:
            module = model.get_submodule(module_name)
            module.to_empty(device="cpu")
            for sub in module.modules():
                if sub._non_persistent_buffers_set:
                    model._init_weights(sub)
            source = aliases.get(module_name, module_name)
            by_file: dict[str, list[tuple[str, str]]] = {}
            for key in module.state_dict():
                tensor_name = self._tensor_name(f"{source}.{key}")
                by_file.setdefault(self._weight_map[tensor_name], []).append((key, tensor_name))
            # One module at a time, file closed after each: the mapped pages of the
            # checkpoint never add up beyond one module, so peak memory stays near what is kept.
            for filename, entries in by_file.items():
                self._fetch(filename)
                with safe_open(str(self.folder / filename), framework="pt") as file:
                    for key, tensor_name in entries:
                        _assign(module, key, file.get_tensor(tensor_name))

    def _tensor_name(self, name: str) -> str:
        if name in self._weight_map:
            return name
        # Older checkpoints (GPT-2 on the Hub) store the base model's tensors without its prefix.
        prefix, _, rest = name.partition(".")
        if rest in self._weight_map:
            return rest
        raise LambdaSplitError(f"checkpoint {self.name} has no tensor {name!r}")


def _assign(module: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put the loaded tensor in place, in the skeleton's dtype for it (no second copy: peak memory stays at one)."""
    owner_name, _, attr = key.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    current = getattr(owner, attr)
    if tuple(current.shape) != tuple(tensor.shape):
        raise LambdaSplitError(f"tensor {key}: checkpoint shape {tuple(tensor.shape)} != model {tuple(current.shape)}")
    tensor = tensor.to(current.dtype) if tensor.is_floating_point() else tensor
    if isinstance(current, torch.nn.Parameter):
        setattr(owner, attr, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        owner._buffers[attr] = tensor


def _safetensors_header(path: Path) -> dict:
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        return json.loads(file.read(length))
