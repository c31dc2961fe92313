"""The transformers-native client: `SplitModelForCausalLM.generate(...)` over a real
`lambdasplit serve` process equals `lambdasplit generate` (greedy) and the unsplit model's own
generate() with transformers' logits processors, stopping criteria, streamers and sampling."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from lambdasplit.client.hf_model import SplitModelForCausalLM
from lambdasplit.client.run import run_generation
from lambdasplit.errors import UsageError
from lambdasplit.server.process import ServerProcess

FAMILY = "gpt_oss"  # mixture of experts, attention sinks, alternating sliding windows
SPLIT = "2:4"
PROMPT = "The quick brown fox jumps over the lazy dog and keeps running"


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    folder = str(tiny_model_dir(FAMILY))
    with ServerProcess(["--model", folder, "--layers", SPLIT]) as server:
        yield folder, server.address


@pytest.fixture(scope="module")
def split_model(served):
    folder, address = served
    with SplitModelForCausalLM.from_pretrained(folder, split=SPLIT, server=address) as model:
        yield model


@pytest.fixture(scope="module")
def unsplit(served):
    return AutoModelForCausalLM.from_pretrained(served[0], dtype=torch.float32).eval()


def test_greedy_generate_equals_lambdasplit_generate(served, split_model):
    folder, address = served
    record = run_generation(model=folder, mode="split", prompt=PROMPT, max_new_tokens=20, split=SPLIT,
                            server=address)
    prompt_ids = split_model.split_device.encode(PROMPT)
    out = split_model.generate(torch.tensor([prompt_ids]), max_new_tokens=20, do_sample=False)
    assert out[0, len(prompt_ids):].tolist() == record["token_ids"]


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.chunks.append("end")


class StopAfterToken(StoppingCriteria):
    """Stops once the given token has been generated (a user's own criterion)."""

    def __init__(self, token_id: int, prompt_length: int):
        self.token_id, self.prompt_length = token_id, prompt_length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([self.token_id in input_ids[0, self.prompt_length:].tolist()])


def test_processors_stopping_criteria_streamer_and_sampling_work_unchanged(split_model, unsplit):
    prompt_ids = split_model.split_device.encode(PROMPT, chat=False)
    inputs = torch.tensor([prompt_ids])
    settings = dict(max_new_tokens=24, do_sample=False, repetition_penalty=1.5, no_repeat_ngram_size=2)
    free = unsplit.generate(inputs, **settings)
    stop_token = free[0, len(prompt_ids) + 10].item()  # the 11th new token: stopping must cut there or earlier
    criteria = lambda: StoppingCriteriaList([StopAfterToken(stop_token, len(prompt_ids))])  # noqa: E731
    expected = unsplit.generate(inputs, stopping_criteria=criteria(), **settings)
    streamer = Collect()
    trips = split_model.body.round_trips
    got = split_model.generate(inputs, stopping_criteria=criteria(), streamer=streamer, **settings)
    assert got.tolist() == expected.tolist()
    new = expected[0, len(prompt_ids):].tolist()
    assert len(new) <= 11 and new[-1] == stop_token
    assert streamer.chunks == [prompt_ids, *[[t] for t in new], "end"]
    assert split_model.body.round_trips - trips == len(new)  # one round trip per generated token

    torch.manual_seed(3)
    sampled_split = split_model.generate(inputs, max_new_tokens=16, do_sample=True, temperature=0.8, top_k=50)
    torch.manual_seed(3)
    sampled = unsplit.generate(inputs, max_new_tokens=16, do_sample=True, temperature=0.8, top_k=50)
    assert sampled_split.tolist() == sampled.tolist()


def test_forward_gives_every_position_logits(split_model, unsplit):
    ids = torch.tensor([split_model.split_device.encode(PROMPT, chat=False)])
    torch.testing.assert_close(split_model(ids).logits, unsplit(ids).logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(split_model(ids, logits_to_keep=1).logits, unsplit(ids).logits[:, -1:],
                               atol=1e-4, rtol=0)


def test_refuses_batches_padding_and_a_transformers_cache(split_model):
    with pytest.raises(UsageError, match="one sequence"):
        split_model(torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(UsageError, match="padding"):
        split_model(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1]]))
    with pytest.raises(UsageError, match="use_cache=False"):
        split_model.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=2, use_cache=True)
