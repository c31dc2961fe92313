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


# What a Hub checkpoint's folder needs before any weight is read: config, shard index,
# tokenizer, chat template, generation config. Weight files come later, one by one, and
# only those a side runs.
_SMALL_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "tokenizer*"]


def _local_folder(model: str) -> tuple[Path, bool]:
    """(a local folder for `model`, whether it is a Hub snapshot): a path as is, `zoo:NAME`
    resolved, a Hub id with its small files downloaded (no weights yet)."""
    from lambdasplit.zoo import resolve

    model = resolve(model)
    if os.path.isdir(model):
        return Path(model), False
    if model.startswith((".", "/", "~")) or os.path.exists(model):  # a path, not a Hub id
        reason = "is not a folder" if os.path.exists(model) else "does not exist"
        raise LambdaSplitError(f"the local folder {model!r} {reason}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=_SMALL_FILES)), True
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LambdaSplitError(f"cannot find model {model!r}: no such local folder, and not on the Hub "
                               f"({first_line})") from error


class Checkpoint:
    """One model checkpoint: its config, its tensor -> file map, and its fingerprint."""

    def __init__(self, model: str):
        self.name = model
        self.folder, self.from_hub = _local_folder(model)
        if not (self.folder / "config.json").exists():
            if (self.folder / "model_index.json").exists():
                raise LambdaSplitError(f"{model!r} is a diffusers text-to-image pipeline, not a language model: "
                                       f"use `lambdasplit imagine --model {model}` (and `serve --component unet`)")
            raise LambdaSplitError(f"{model!r} has no config.json: not a transformers checkpoint")
        self.config = AutoConfig.from_pretrained(self.folder)
        self._headers: dict[str, dict] = {}
        self._renamed: dict[str, str] | None = None  # checkpoint tensor -> model tensor, where they differ
        self._weight_map = self._read_weight_map()

    def _read_weight_map(self) -> dict[str, str]:
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            return json.loads(index.read_text())["weight_map"]
        return {name: "model.safetensors" for name in self._header("model.safetensors")}

    def _header(self, filename: str) -> dict:
        """{tensor name: {"dtype", "shape"}} of one safetensors file, without reading its weights:
        from the local file's header, or for a Hub file not downloaded yet, from the Hub's metadata."""
        if filename not in self._headers:
            self._headers[filename] = self._read_header(filename)
        return self._headers[filename]

    def _read_header(self, filename: str) -> dict:
        path = self.folder / filename
        if path.exists():
            header = _safetensors_header(path)
            header.pop("__metadata__", None)
            return header
        if not self.from_hub:
            raise LambdaSplitError(f"{self.folder} has no {filename} (lambdasplit reads only safetensors weights)")
        try:
            from huggingface_hub import get_safetensors_metadata

            files = get_safetensors_metadata(self.name).files_metadata
        except Exception as error:
            raise LambdaSplitError(f"cannot read the safetensors metadata of {self.name!r} on the Hub: {error}") from error
        if filename not in files:
            raise LambdaSplitError(f"{self.name!r} has no {filename} on the Hub (lambdasplit reads only safetensors weights)")
        return {name: {"dtype": info.dtype, "shape": list(info.shape)} for name, info in files[filename].tensors.items()}

    def _fetch(self, filename: str) -> None:
        """Make sure one weight file is in the folder (downloads it for a Hub checkpoint)."""
        if (self.folder / filename).exists():
            return
        if not self.from_hub:
            raise LambdaSplitError(f"{self.folder} is missing {filename}, which holds tensors this side needs")
        try:
            from huggingface_hub import hf_hub_download

            # The snapshot's revision, so a new commit on the Hub cannot mix files of two versions.
            hf_hub_download(self.name, filename, revision=self.folder.name)
        except Exception as error:
            raise LambdaSplitError(f"cannot download {filename} of {self.name!r}: {error}") from error

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
            header = self._header("model.safetensors")
            layout = {name: [info["dtype"], list(info["shape"])] for name, info in header.items()}
        digest.update(json.dumps(layout, sort_keys=True).encode())
        return digest.hexdigest()[:32]

    def has_tensor(self, name: str, model=None) -> bool:
        """Whether the checkpoint stores this tensor; with `model` (a skeleton), also under a legacy name
        (GPT-NeoX's `embed_out` for `lm_head`)."""
        if name in self._weight_map:
            return True
        if model is not None:
            self._converted_sources(model, "")
            return name in self._renamed.values()
        return False

    def skeleton(self, dtype: torch.dtype = torch.float32):
        """The whole model on the meta device: structure and config, no memory.

        Built in `dtype` as `from_pretrained(dtype=...)` builds it, so every tensor gets the
        dtype transformers would give it (rotary frequencies stay float32 in a bf16 model).
        """
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        _keep_in_fp32(model, dtype)
        return model

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
            converted = self._converted_sources(model, module_name) if source == module_name else {}
            by_file: dict[str, list[tuple[str, str]]] = {}
            for key in module.state_dict():
                if key in converted:  # stored in another layout (MoE experts): transformers' converter below
                    continue
                tensor_name = self._tensor_name(f"{source}.{key}")
                by_file.setdefault(self._weight_map[tensor_name], []).append((key, tensor_name))
            for key, (converter, sources) in converted.items():
                for tensor_name in sources:
                    filename = self._weight_map[tensor_name]
                    self._fetch(filename)
                    with safe_open(str(self.folder / filename), framework="pt") as file:
                        converter.add_tensor(f"{module_name}.{key}", tensor_name, self._patterns[tensor_name],
                                             file.get_tensor(tensor_name))
                for full_name, tensor in converter.convert(f"{module_name}.{key}", model=model, config=model.config).items():
                    _assign(module, full_name.removeprefix(f"{module_name}."), tensor[0] if isinstance(tensor, list) else tensor)
            # One module at a time, file closed after each: the mapped pages of the
            # checkpoint never add up beyond one module, so peak memory stays near what is kept.
            for filename, entries in by_file.items():
                self._fetch(filename)
                with safe_open(str(self.folder / filename), framework="pt") as file:
                    for key, tensor_name in entries:
                        _assign(module, key, file.get_tensor(tensor_name))

    def _converted_sources(self, model, module_name: str) -> dict:
        """{key in the module: (transformers' WeightConverter, checkpoint tensors)} for the module's
        tensors that the checkpoint stores in another layout (e.g. one tensor per expert, where the
        model holds them fused), or renamed (a legacy module name), by transformers' own conversion rules."""
        if self._renamed is None:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

            mapping = get_model_conversion_mapping(model)
            renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
            self._converters = [m for m in mapping if isinstance(m, WeightConverter)]
            meta = model.state_dict()
            self._renamed, self._patterns = {}, {}
            for name in self._weight_map:
                target, pattern = rename_source_key(name, renamings, self._converters, model.base_model_prefix, meta)
                if target != name and target in meta:
                    self._renamed[name] = target
                    self._patterns[name] = pattern if pattern is not None else name
        from copy import deepcopy

        from transformers.core_model_loading import WeightRenaming, dot_natural_key

        by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        converted: dict[str, tuple] = {}
        for name in sorted(self._renamed, key=dot_natural_key):  # the order transformers stacks experts in
            target = self._renamed[name]
            if not target.startswith(f"{module_name}."):
                continue
            key = target.removeprefix(f"{module_name}.")
            pattern = self._patterns[name]
            if key not in converted:
                converter = deepcopy(by_pattern[pattern]) if pattern in by_pattern else WeightRenaming(name, target)
                converted[key] = (converter, [])
            converted[key][1].append(name)
        return converted

    def _tensor_name(self, name: str) -> str:
        if name in self._weight_map:
            return name
        # Older checkpoints (GPT-2 on the Hub) store the base model's tensors without its prefix.
        prefix, _, rest = name.partition(".")
        if rest in self._weight_map:
            return rest
        raise LambdaSplitError(f"checkpoint {self.name} has no tensor {name!r}")


def _keep_in_fp32(model, dtype: torch.dtype) -> None:
    """Keep float32 what `from_pretrained(dtype=...)` keeps float32 (a family's `_keep_in_fp32_modules`,
    e.g. GPT-OSS's norms in float16), with transformers' own plan and pattern matching."""
    plan = model._get_dtype_plan(dtype)
    if not plan:
        return
    from transformers.core_model_loading import build_glob_alternation

    alternation, by_group, _ = build_glob_alternation(list(plan))
    for name, param in list(model.named_parameters()):
        match = alternation.search(name)
        if match:
            owner_name, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            setattr(owner, attr, torch.nn.Parameter(param.to(plan[by_group[match.lastgroup]]), requires_grad=False))


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
