"""Each side holds only what it runs: peak memory of the body server and of the device.

On a model large enough to stand out above the interpreter (8 layers x 1024, vocab
32000, ~660 MB in fp32), each side is loaded in a fresh process and its peak RSS over
the interpreter's own baseline is compared with the size of the weights it should hold.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import torch


def peak_mb():
    # VmHWM (peak RSS) starts afresh at exec; ru_maxrss would carry the parent's peak over.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

from lambdasplit.llm import Checkpoint, load_body, load_head, load_tail
from transformers import AutoModelForCausalLM
folder, side = sys.argv[1], sys.argv[2]
checkpoint = Checkpoint(folder)
baseline = peak_mb()
# Each side loads what it holds and runs one step, so lazily mapped weights are really touched.
if side == "body":
    load_body(checkpoint, 2, 6).forward(torch.randn(1, 4, 1024), 0)
elif side == "device":
    head = load_head(checkpoint, 2)
    load_tail(checkpoint, 6, head=head).forward(head.forward(torch.tensor([[1, 2, 3, 4]]), 0), 0)
else:
    AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(torch.tensor([[1, 2, 3, 4]]))
print(json.dumps({"delta_mb": peak_mb() - baseline}))
"""


def peak_mb(folder, side: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), side], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["delta_mb"]


@pytest.fixture(scope="module")
def big_model(tiny_model_dir):
    return tiny_model_dir("llama", num_layers=8, hidden_size=1024, vocab_size=32000)


def weights_mb(folder, prefixes: tuple[str, ...]) -> float:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as file:
        return sum(file.get_slice(name).get_shape().numel() if hasattr(file.get_slice(name).get_shape(), "numel")
                   else _numel(file.get_slice(name).get_shape())
                   for name in file.keys() if name.startswith(prefixes)) * 4 / 2**20


def _numel(shape) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def test_each_side_loads_only_its_weights(big_model):
    body_w = weights_mb(big_model, tuple(f"model.layers.{i}." for i in range(2, 6)))
    device_w = weights_mb(big_model, ("model.embed_tokens", "lm_head", "model.norm")
                          + tuple(f"model.layers.{i}." for i in (0, 1, 6, 7)))
    body, device, whole = peak_mb(big_model, "body"), peak_mb(big_model, "device"), peak_mb(big_model, "whole")
    print(f"peak RSS over baseline: body {body:.0f} MB (holds {body_w:.0f} MB of weights), "
          f"device {device:.0f} MB (holds {device_w:.0f} MB), whole model {whole:.0f} MB")
    # Each side's peak is its own weights plus a bounded overhead; neither comes near the whole model.
    assert body < 1.3 * body_w + 50
    assert device < 1.3 * device_w + 50
    assert body < 0.5 * whole
    assert device < whole - 0.6 * body_w  # the device does not hold the body's layers
