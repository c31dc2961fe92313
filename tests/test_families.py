"""The exactness matrix of issue 17: every family lambdasplit accepts, split over a real socket to a
real server process, reproduces the unsplit transformers model; hybrid and recurrent families are
refused by name.

fp32: for every accepted family (tests/tiny_models.py ALL_FAMILIES), greedy ids equal the unsplit
model's own `generate()` and every step's logits agree to 1e-4, for splits with X=0, a middle
body, X=Y (an empty body) and Y=N. bf16 / fp16: ids and logits are bit-equal to
`from_pretrained(dtype=...)`'s `generate()`.

Cost: one server process (tests/family_server.py: the BodyServer `serve` runs) hosts every body
of every family and dtype, so the module pays for one process start and each model is built once;
few new tokens, since the 34-token prompt alone is past the tiny models' 16-position windows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from lambdasplit.client import DeviceModel, RemoteBody
from lambdasplit.errors import UnsupportedModelError
from lambdasplit.llm import SUPPORTED_FAMILIES, Checkpoint, family_for, load_body, load_head, load_tail
from lambdasplit.server.process import ServerProcess
from tiny_models import ALL_FAMILIES, MORE_FAMILIES, SLIDING_WINDOW

LAYERS = 4  # cheaper than the default 6; mixed layer types are S F S S, so 0:2 and 1:3 hold both kinds
SPLITS = [(0, 2), (1, 3), (2, 2), (2, 4)]  # X=0, a middle body, an empty body (X=Y), Y=N
HALF_SPLIT = (1, 3)
HALF = [("bfloat16", "bf16"), ("float16", "fp16")]
NEW_TOKENS = 6
HALF_NEW_TOKENS = 4
PROMPT = "The quick brown fox jumps over the lazy dog and keeps running"


class FamilyServer(ServerProcess):
    """tests/family_server.py as a process, started and stopped like `lambdasplit serve`."""

    def __init__(self, spec: Path):
        super().__init__([])
        self.args = [sys.executable, str(Path(__file__).with_name("family_server.py")), str(spec)]


def reference(folder, prompt_ids, new_tokens, dtype=torch.float32):
    """Greedy ids and per-step logits of the unsplit model's own generate()."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    out = model.generate(
        torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt_ids):].tolist(), torch.stack(out.logits)[:, 0].float()


@pytest.fixture(scope="module")
def matrix_server(tiny_model_dir, tmp_path_factory):
    """One server process on a real loopback socket hosting every body the matrix uses."""
    spec = []
    for family in ALL_FAMILIES:
        folder = str(tiny_model_dir(family, num_layers=LAYERS))
        spec += [[folder, f"{x}:{y}", "float32"] for x, y in SPLITS]
        spec += [[folder, f"{HALF_SPLIT[0]}:{HALF_SPLIT[1]}", dtype] for dtype, _ in HALF]
    path = tmp_path_factory.mktemp("family-server") / "spec.json"
    path.write_text(json.dumps(spec))
    with FamilyServer(path) as server:
        yield server


def split_generate(checkpoint, split, server, prompt_ids, new_tokens, dtype="float32", codec="fp32"):
    device = DeviceModel.load(checkpoint, split, dtype)
    with RemoteBody.for_device(device, server.address, codec=codec) as body:
        result = device.generate(prompt_ids, body=body, max_new_tokens=new_tokens, ignore_eos=True, keep_logits=True)
        assert body.round_trips == new_tokens  # the prompt in one step, then one per new token but the last
    logits = torch.stack(result.logits).float()
    return result.token_ids, logits, list(device.eos_ids)


def test_every_tested_family_is_accepted_and_every_accepted_family_is_tested():
    assert set(ALL_FAMILIES) == set(SUPPORTED_FAMILIES)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_split_matches_unsplit_generate_fp32(family, tiny_model_dir, matrix_server):
    folder = tiny_model_dir(family, num_layers=LAYERS)
    checkpoint = Checkpoint(str(folder))
    prompt_ids = DeviceModel.load(checkpoint).encode(PROMPT, chat=False)
    assert len(prompt_ids) > SLIDING_WINDOW  # the prompt alone is past the sliding windows
    ref_ids, ref_logits = reference(folder, prompt_ids, NEW_TOKENS)
    # a collapsed model (one token forever, the same logits every step) would prove little
    assert len(set(ref_ids)) > 1 and (ref_logits[1:] - ref_logits[:-1]).abs().amax(dim=-1).min() > 0.1
    for split in SPLITS:
        ids, logits, eos = split_generate(checkpoint, split, matrix_server, prompt_ids, NEW_TOKENS)
        assert ids == ref_ids, f"{family} split {split}"
        logits[:, eos] = ref_logits[:, eos]  # both sides mask EOS to -inf (min_new_tokens); compare the rest
        torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0, msg=f"{family} split {split}")


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_split_is_bit_equal_in_half_precision(family, tiny_model_dir, matrix_server):
    folder = tiny_model_dir(family, num_layers=LAYERS)
    checkpoint = Checkpoint(str(folder))
    prompt_ids = DeviceModel.load(checkpoint).encode(PROMPT, chat=False)
    for dtype, codec in HALF:
        ref_ids, ref_logits = reference(folder, prompt_ids, HALF_NEW_TOKENS, dtype=getattr(torch, dtype))
        assert torch.isfinite(ref_logits).any(dim=-1).all(), f"{family} {dtype}: the reference overflowed"
        ids, logits, eos = split_generate(checkpoint, HALF_SPLIT, matrix_server, prompt_ids, HALF_NEW_TOKENS,
                                          dtype, codec)
        assert ids == ref_ids, f"{family} {dtype}"
        logits[:, eos] = ref_logits[:, eos]
        torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0, equal_nan=True, msg=f"{family} {dtype}")


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_steps_of_several_positions_and_cut_back(family, tiny_model_dir):
    """Steps of k positions and a cut-back past the sliding window (30 positions, window 16,
    back to 12) give the logits of one 30-position step: what speculative decoding and replay need."""
    folder = str(tiny_model_dir(family, num_layers=LAYERS))
    head, body, tail = load_head(folder, 1), load_body(folder, 1, 3), load_tail(folder, 3)
    ids = torch.randint(0, 400, (1, 30), generator=torch.Generator().manual_seed(0))

    def run(chunks):
        outs, start = [], 0
        for n in chunks:
            piece = ids[:, start:start + n]
            outs.append(tail.forward(body.forward(head.forward(piece, start), start), start, last_only=False))
            start += n
        return torch.cat(outs, dim=1)

    whole = run([30])
    torch.testing.assert_close(run([10, 1, 5, 14]), whole, atol=1e-4, rtol=0)
    for stack in (head.stack, body.stack, tail.stack):
        stack.truncate(12)
    rest = tail.forward(body.forward(head.forward(ids[:, 12:], 12), 12), 12, last_only=False)
    torch.testing.assert_close(rest, whole[:, 12:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("config_class,name", [
    (transformers.MambaConfig, "mamba"), (transformers.JambaConfig, "jamba"),
    (transformers.FalconH1Config, "falcon_h1"), (transformers.Lfm2Config, "lfm2"),
    (transformers.Qwen3NextConfig, "qwen3_next"),
])
def test_hybrid_and_recurrent_families_are_refused_by_name_with_the_reason(config_class, name):
    with pytest.raises(UnsupportedModelError, match=rf"'{name}' is refused: .*cannot be cut back"):
        family_for(config_class())


def test_unknown_family_refusal_points_to_check():
    with pytest.raises(UnsupportedModelError, match=r"'bloom' is not supported.*lambdasplit check"):
        family_for(transformers.BloomConfig())


def test_settings_an_adapter_does_not_reproduce_are_refused():
    with pytest.raises(UnsupportedModelError, match="bidirectional"):
        family_for(transformers.Gemma3TextConfig(use_bidirectional_attention=True))
    with pytest.raises(UnsupportedModelError, match="vision tower"):
        family_for(transformers.Gemma3Config())
