"""Speculative decoding across the split: greedy ids and logits equal plain split decoding
over a real loopback server, for every tested family and every draft source, including
EOS and max_new_tokens inside a drafted block; the server's cache is cut back to the
committed length; rejected positions' bytes are counted.
"""

from __future__ import annotations

import pytest
import torch

from lambdasplit.client import DeviceModel, RemoteBody
from lambdasplit.client.generation import Sampler, Sampling, StepModel
from lambdasplit.errors import UsageError
from lambdasplit.llm import Checkpoint
from lambdasplit.server import BodyServer, BodyService
from lambdasplit.speculative import Draft, make_source
from lambdasplit.speculative.eagle import EagleHead, EagleSource, head_config
from lambdasplit.speculative.sources import lookup_continuation
from tiny_models import FAMILIES

SPLIT = (2, 4)
NEW_TOKENS = 20
PROMPT = "The quick brown fox jumps over the lazy dog and the quick brown fox keeps running"


class ScriptedSource:
    """Drafts a known continuation with every `wrong`-th token replaced: multi-token acceptance
    and rejections at known places (random tiny models give real sources little to accept)."""

    name = "scripted"

    def __init__(self, prompt_len: int, continuation: list[int], wrong: int = 3, vocab: int = 100):
        self.prompt_len, self.continuation, self.wrong, self.vocab = prompt_len, continuation, wrong, vocab

    def propose(self, sequence, k):
        done = len(sequence) - self.prompt_len
        tokens = list(self.continuation[done:done + k])
        for i in range(len(tokens)):
            if (done + i) % self.wrong == self.wrong - 1:
                tokens[i] = (tokens[i] + 1) % self.vocab
        return Draft(tokens)

    def observe(self, sequence, step):
        pass


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    """One in-process server per family hosting the body of SPLIT: real sockets."""
    out = {}
    for family in FAMILIES:
        folder = tiny_model_dir(family)
        out[family] = (folder, BodyServer([BodyService(str(folder), f"{SPLIT[0]}:{SPLIT[1]}")]).start_in_thread())
    yield out
    for _, server in out.values():
        server.stop()


def _split_run(device, server, prompt_ids, source=None, **kw):
    with RemoteBody.for_device(device, server.address) as body:
        result = device.generate(prompt_ids, body=body, keep_logits=True, speculate=source, **kw)
        return result, body.round_trips, body.bytes_up, body.bytes_down


@pytest.mark.parametrize("family", FAMILIES)
def test_every_source_equals_plain_split(family, servers, tiny_model_dir):
    folder, server = servers[family]
    device = DeviceModel.load(Checkpoint(str(folder)), SPLIT)
    prompt_ids = device.encode(PROMPT, chat=False)
    plain, plain_trips, _, _ = _split_run(device, server, prompt_ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert len(set(plain.token_ids)) > 3, "the tiny model collapsed; the comparison would prove little"
    assert plain_trips == NEW_TOKENS
    draft_folder = str(tiny_model_dir("llama", num_layers=2, seed=1))  # shares the tiny models' tokenizer
    sources = {
        "lookup": make_source("lookup"), "lookahead": make_source("lookahead"),
        "draft": make_source("draft", device, draft_model=draft_folder),
        "self-draft": make_source("draft", device, draft_model=str(folder)),  # the model itself: all accepted
        "scripted": ScriptedSource(len(prompt_ids), plain.token_ids),
    }
    torch.manual_seed(0)
    head = EagleHead(head_config(device.checkpoint.config)).eval()  # untrained: exactness needs no quality
    sources["eagle"] = EagleSource(head, device.head.embed, device.tail)
    for name, source in sources.items():
        for k in (4, "auto"):
            result, trips, _, _ = _split_run(device, server, prompt_ids, source, max_new_tokens=NEW_TOKENS,
                                             ignore_eos=True, draft_tokens=k)
            assert result.token_ids == plain.token_ids, f"{family} {name} k={k}"
            torch.testing.assert_close(torch.stack(result.logits), torch.stack(plain.logits), atol=1e-4, rtol=0)
            assert trips == result.steps
    # the model drafting for itself accepts everything: k = 4 commits 5 tokens a round trip
    result, trips, _, _ = _split_run(device, server, prompt_ids, sources["self-draft"], max_new_tokens=NEW_TOKENS,
                                     ignore_eos=True, draft_tokens=4)
    assert trips == 4 and result.accepted == result.drafted == 16 and result.accepted_per_step == 5.0
    result, trips, _, _ = _split_run(device, server, prompt_ids, ScriptedSource(len(prompt_ids), plain.token_ids),
                                     max_new_tokens=NEW_TOKENS, ignore_eos=True, draft_tokens=4)
    assert result.drafted > result.accepted > 0 and trips < NEW_TOKENS


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_eos_and_max_length_inside_a_drafted_block(family, servers):
    folder, server = servers[family]
    device = DeviceModel.load(Checkpoint(str(folder)), SPLIT)
    prompt_ids = device.encode(PROMPT, chat=False)
    plain, _, _, _ = _split_run(device, server, prompt_ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    # An EOS id that the model produces at position 7 (a block of k = 4 spans positions 5..9)
    device.eos_ids = {plain.token_ids[7]}
    first = plain.token_ids.index(plain.token_ids[7])
    reference, _, _, _ = _split_run(device, server, prompt_ids, max_new_tokens=NEW_TOKENS)
    assert reference.token_ids == plain.token_ids[:first + 1]
    for source in (ScriptedSource(len(prompt_ids), plain.token_ids, wrong=100), make_source("lookup")):
        result, _, _, _ = _split_run(device, server, prompt_ids, source, max_new_tokens=NEW_TOKENS, draft_tokens=4)
        assert result.token_ids == reference.token_ids
    device.eos_ids = set()
    for max_new in (0, 1, 2, 6, 7):  # with k = 4 every block is cut to the room left
        source = ScriptedSource(len(prompt_ids), plain.token_ids, wrong=100)
        result, trips, _, _ = _split_run(device, server, prompt_ids, source, max_new_tokens=max_new, draft_tokens=4)
        assert result.token_ids == plain.token_ids[:max_new]
        assert trips == {0: 0, 1: 1, 2: 1, 6: 2, 7: 2}[max_new]


def _server_session(server):
    (handler,) = list(server.sessions.values())
    return handler


def test_server_cache_is_cut_back_to_the_committed_length(servers):
    """Through the protocol: a verify step with rejections, then the next step's start cuts the server's cache."""
    folder, server = servers["llama"]
    device = DeviceModel.load(Checkpoint(str(folder)), SPLIT)
    prompt_ids = device.encode(PROMPT, chat=False)
    device.eos_ids = set()  # nothing masked: the logits compare whole
    plain, _, _, _ = _split_run(device, server, prompt_ids, max_new_tokens=8)
    truth = plain.token_ids
    with RemoteBody.for_device(device, server.address) as body:
        model = StepModel(device.head, body, device.tail)
        n = len(prompt_ids)
        model.step(0, prompt_ids, last=1)
        assert _server_session(server).body.stack.length == n
        drafts = [truth[1], truth[2], truth[3] + 1, truth[4]]  # the third is wrong
        logits = model.step(n, [truth[0]] + drafts, last=5)
        committed = [truth[0]] + [int(t) for t in torch.argmax(logits, -1)[:3]]
        assert committed == truth[:4]  # two drafts accepted, the third corrected
        assert _server_session(server).body.stack.length == n + 5  # the rejected positions are still there...
        next_logits = model.step(n + 3, [committed[-1]], last=1)  # ...until the step at the committed length
        assert _server_session(server).body.stack.length == n + 4 == len(prompt_ids) + len(committed)
        assert device.head.stack.length == device.tail.stack.length == n + 4
        assert int(torch.argmax(next_logits[-1])) == truth[4]
        torch.testing.assert_close(next_logits[-1], plain.logits[4], atol=1e-4, rtol=0)
        # rejected positions cost bytes both ways: every position sent is in the payload
        assert model.positions == n + 5 + 1
        assert body.stats.payload_bytes == model.positions * device.checkpoint.config.hidden_size * 4


def test_rejected_positions_bytes_are_counted(servers):
    folder, server = servers["qwen2"]
    device = DeviceModel.load(Checkpoint(str(folder)), SPLIT)
    prompt_ids = device.encode(PROMPT, chat=False)
    plain, _, plain_up, plain_down = _split_run(device, server, prompt_ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    source = ScriptedSource(len(prompt_ids), plain.token_ids, wrong=2)
    spec, trips, up, down = _split_run(device, server, prompt_ids, source, max_new_tokens=NEW_TOKENS,
                                       ignore_eos=True, draft_tokens=3)
    assert spec.token_ids == plain.token_ids
    rejected = spec.drafted - spec.accepted
    assert rejected > 0
    # each rejected position is D fp32 values up and D down, beyond what plain decoding sent
    per_position = device.checkpoint.config.hidden_size * 4
    positions_sent = len(prompt_ids) + (NEW_TOKENS - 1) + rejected
    assert up - plain_up > (positions_sent - len(prompt_ids) - NEW_TOKENS + 1) * per_position - 64 * NEW_TOKENS
    assert up > positions_sent * per_position and down > positions_sent * per_position


def test_lookup_continuation():
    assert lookup_continuation([5, 6, 7, 1, 5, 6], 3) == [7, 1, 5]
    assert lookup_continuation([1, 2, 3, 9, 2, 3, 8, 2, 3], 2) == [8, 2]  # the latest match
    assert lookup_continuation([1, 2, 3], 4) == []
    assert lookup_continuation([4, 4], 2) == [4]


def test_bad_options_are_refused():
    with pytest.raises(UsageError, match="unknown --speculate"):
        make_source("medusa")
    with pytest.raises(UsageError, match="needs --draft-model"):
        make_source("draft")
    with pytest.raises(UsageError, match="takes no --draft-model"):
        make_source("lookup", draft_model="x")


def _drive(length, step_seconds, alpha, rounds=40):
    """Feed DraftLength the costs of a link/server (step_seconds(n)) and a source accepting with prob alpha."""
    import random

    rng = random.Random(0)
    length.update(30, step_seconds(30), 0, 0, 0.0)  # the prompt's step
    chosen = []
    for _ in range(rounds):
        k = length.choose(100)
        accepted = 0
        while accepted < k and rng.random() < alpha:
            accepted += 1
        length.update(k + 1, step_seconds(k + 1), k, accepted, 0.0005 * k)
        chosen.append(k)
    return chosen


def test_auto_draft_length_follows_the_costs():
    from lambdasplit.speculative.adaptive import DraftLength

    # 80 ms round trip, 2 ms per position: a good source drafts long blocks
    assert min(_drive(DraftLength("auto"), lambda n: 0.080 + 0.002 * n, alpha=0.8)[-10:]) >= 4
    # a fast link where every position costs as much as the round trip: speculation switches itself off
    late = _drive(DraftLength("auto"), lambda n: 0.001 + 0.010 * n, alpha=0.3)[-18:]
    assert sum(k > 0 for k in late) <= 2  # plain steps, but for a probe every 8
    # a fixed k is a fixed k, capped by the room left
    fixed = DraftLength(3)
    assert fixed.choose(10) == 3 and fixed.choose(1) == 1 and fixed.choose(0) == 0


def test_eagle_without_a_trained_head_is_refused(tiny_model_dir, tmp_path):
    device = DeviceModel.load(str(tiny_model_dir("llama")))
    with pytest.raises(UsageError, match="draft head"):
        make_source("eagle", device, draft_model=str(tmp_path))
