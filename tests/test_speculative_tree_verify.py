"""Whole-tree verification across the split (issue #12): one tree step head -> body -> tail, the accepted
path kept by the next step's `keep` on every side.

Greedy ids (and logits to 1e-4) equal `--speculate none` over a real loopback server for every tested
family (sliding-window ones included), with EOS and the maximum length inside a tree; the server's cache
after a tree step with rejections is the committed length; bad parents / keep are refused for that session.
"""

from __future__ import annotations

import pytest
import torch

from lambdasplit.client import DeviceModel, RemoteBody
from lambdasplit.client.generation import StepModel
from lambdasplit.errors import RemoteError
from lambdasplit.llm import Checkpoint
from lambdasplit.llm.segments import load_head, load_tail
from lambdasplit.server import BodyServer, BodyService
from lambdasplit.speculative.eagle import EagleHead, EagleSource, Tree, head_config
from tiny_models import FAMILIES

SPLIT = (2, 4)
NEW_TOKENS = 20
PROMPT = "The quick brown fox jumps over the lazy dog and the quick brown fox keeps running"


class ScriptedTree:
    """A tree whose true continuation is one branch, after a decoy sibling at every level (so the accepted
    path is never a prefix of the flattened order), with every `wrong`-th true token replaced."""

    name = "scripted-tree"
    verify_trees = True

    def __init__(self, prompt_len: int, truth: list[int], wrong: int = 3, vocab: int = 100):
        self.prompt_len, self.truth, self.wrong, self.vocab = prompt_len, truth, wrong, vocab
        self.trees: list[Tree] = []

    def propose_tree(self, sequence, k):
        done = len(sequence) - self.prompt_len
        tree, parent = Tree(), -1
        for depth, token in enumerate(self.truth[done:done + k]):
            if (done + depth) % self.wrong == self.wrong - 1:
                token = (token + 1) % self.vocab
            for t in ((token + 7) % self.vocab, token):  # the decoy first, then the branch that continues
                tree.tokens.append(t)
                tree.parents.append(parent)
                tree.depths.append(depth + 1)
                tree.scores.append(0.0)
            parent = len(tree.tokens) - 1
        self.trees.append(tree)
        return tree

    def propose(self, sequence, k):
        raise AssertionError("a tree source verified as a tree never drafts a chain")

    def observe(self, sequence, step):
        pass


@pytest.fixture(scope="module")
def servers(tiny_model_dir):
    out = {}
    for family in FAMILIES:
        folder = tiny_model_dir(family)
        out[family] = (folder, BodyServer([BodyService(str(folder), f"{SPLIT[0]}:{SPLIT[1]}")]).start_in_thread())
    yield out
    for _, server in out.values():
        server.stop()


def _run(device, server, prompt_ids, source=None, **kw):
    with RemoteBody.for_device(device, server.address) as body:
        result = device.generate(prompt_ids, body=body, keep_logits=True, speculate=source, **kw)
        return result, body.round_trips


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_verification_equals_plain_split(family, servers):
    folder, server = servers[family]
    device = DeviceModel.load(Checkpoint(str(folder)), SPLIT)
    prompt_ids = device.encode(PROMPT, chat=False)
    plain, plain_trips = _run(device, server, prompt_ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    assert len(set(plain.token_ids)) > 3 and plain_trips == NEW_TOKENS
    torch.manual_seed(0)
    eagle = EagleSource(EagleHead(head_config(device.checkpoint.config)).eval(), device.head.embed, device.tail,
                        width=4, branch=4)  # untrained: exactness needs no quality
    hybrid = EagleSource(eagle.head, device.head.embed, device.tail, width=4, branch=4, lookup=True)
    sizes = []  # eagle+lookup's tree sizes: above k only with a grafted lookup path
    propose_tree = hybrid.propose_tree

    def recorded(sequence, k):
        tree = propose_tree(sequence, k)
        sizes.append((k, len(tree.tokens)))
        return tree
    hybrid.propose_tree = recorded
    for name, source in (("scripted", ScriptedTree(len(prompt_ids), plain.token_ids)), ("eagle-tree", eagle),
                         ("eagle+lookup", hybrid)):
        for k in (4, "auto"):
            result, trips = _run(device, server, prompt_ids, source, max_new_tokens=NEW_TOKENS, ignore_eos=True,
                                 draft_tokens=k)
            assert result.token_ids == plain.token_ids, f"{family} {name} k={k}"
            torch.testing.assert_close(torch.stack(result.logits), torch.stack(plain.logits), atol=1e-4, rtol=0)
            assert trips == result.steps
    # lookup's paths were grafted on and sent (the prompt repeats itself, so lookup finds continuations)
    assert any(n > k for k, n in sizes)
    scripted = ScriptedTree(len(prompt_ids), plain.token_ids)
    result, trips = _run(device, server, prompt_ids, scripted, max_new_tokens=NEW_TOKENS, ignore_eos=True,
                         draft_tokens=4)
    assert result.accepted > 0 and trips < NEW_TOKENS and result.drafted == sum(len(t.tokens) for t in scripted.trees)


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_eos_and_max_length_inside_a_tree(family, servers):
    folder, server = servers[family]
    device = DeviceModel.load(Checkpoint(str(folder)), SPLIT)
    prompt_ids = device.encode(PROMPT, chat=False)
    plain, _ = _run(device, server, prompt_ids, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    device.eos_ids = {plain.token_ids[7]}  # a tree of depth 4 spans tokens 5..9 in the second round
    first = plain.token_ids.index(plain.token_ids[7])
    reference, _ = _run(device, server, prompt_ids, max_new_tokens=NEW_TOKENS)
    assert reference.token_ids == plain.token_ids[:first + 1]
    result, _ = _run(device, server, prompt_ids, ScriptedTree(len(prompt_ids), plain.token_ids, wrong=100),
                     max_new_tokens=NEW_TOKENS, draft_tokens=4)
    assert result.token_ids == reference.token_ids
    device.eos_ids = set()
    for max_new in (1, 2, 6, 7):
        source = ScriptedTree(len(prompt_ids), plain.token_ids, wrong=100)
        result, trips = _run(device, server, prompt_ids, source, max_new_tokens=max_new, draft_tokens=4)
        assert result.token_ids == plain.token_ids[:max_new]
        assert trips == {1: 1, 2: 1, 6: 2, 7: 2}[max_new]


def _session(server):
    (handler,) = list(server.sessions.values())
    return handler


def test_server_cache_after_a_tree_step_is_the_committed_length(servers):
    """Through the protocol: a tree step with rejections, then `keep`: the server keeps the path only."""
    folder, server = servers["mistral"]  # sliding-window layers on the server too
    device = DeviceModel.load(Checkpoint(str(folder)), SPLIT)
    prompt_ids = device.encode(PROMPT, chat=False)
    device.eos_ids = set()
    plain, _ = _run(device, server, prompt_ids, max_new_tokens=8)
    truth = plain.token_ids
    with RemoteBody.for_device(device, server.address) as body:
        assert body.tree_steps
        model = StepModel(device.head, body, device.tail)
        n = len(prompt_ids)
        model.step(0, prompt_ids, last=1)
        # pending truth[0]; offsets 1, 2: decoy and truth[1]; 3, 4 under truth[1]: decoy, truth[2];
        # 5 under truth[2]: a wrong token (rejected)
        tokens = [truth[0], truth[1] + 1, truth[1], truth[2] + 1, truth[2], truth[3] + 1]
        parents = [-1, 0, 0, 2, 2, 4]
        logits = model.step(n, tokens, last=6, parents=parents)
        assert _session(server).body.stack.length == n + 6
        assert [int(torch.argmax(logits[r])) for r in (0, 2, 4)] == truth[1:4]  # down the true branch; 5 rejected
        keep = [0, 2, 4]  # the committed path: pending, truth[1], truth[2]; truth[3] is the target's own
        next_logits = model.step(n + 3, [truth[3]], last=1, keep=keep)
        assert _session(server).body.stack.length == n + 4 == len(prompt_ids) + 4
        assert device.head.stack.length == device.tail.stack.length == n + 4
        torch.testing.assert_close(next_logits[-1], plain.logits[4], atol=1e-4, rtol=0)


@pytest.mark.parametrize("parents, keep, position, message", [
    ([-1, 0, 5], None, 3, "parent 5"),
    ([-1, 0, 0], [0, 1, 2], 3, "does not continue the path"),
    ([-1, 0, 0], None, 3, "must name the kept path"),  # offsets 0..2 of a tree that branches at 0
    ([-1, 0, 0], [0, 9], 2, "outside the previous step"),
    ([-1, 0, 0], [0, 2], 3, "only 2 positions are cached"),  # a valid path, but the step starts beyond it
])
def test_bad_trees_are_refused_for_that_session_only(servers, parents, keep, position, message):
    folder, server = servers["llama"]
    device = DeviceModel.load(Checkpoint(str(folder)), SPLIT)
    hidden = torch.randn(1, 3, device.checkpoint.config.hidden_size)
    other = RemoteBody.for_device(device, server.address)
    other.forward(torch.randn(1, 4, device.checkpoint.config.hidden_size), 0)
    with RemoteBody.for_device(device, server.address) as body:
        with pytest.raises(RemoteError, match=message) as refused:
            body.forward(hidden, 0, parents=parents)
            body.forward(hidden[:, :1], position, keep=keep)  # the second STEP names the kept path of the first
        assert refused.value.code in ("bad_step", "out_of_order") and "\n" not in str(refused.value)
    out = other.forward(torch.randn(1, 1, device.checkpoint.config.hidden_size), 4)  # still served
    assert out.shape[1] == 1
    other.close()


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gpt2"])
def test_tree_step_logits_equal_each_path_as_a_chain(family, tiny_model_dir):
    """In-process (head + tail, no body): each node of a tree step sees the prefix and its ancestors only,
    at position prefix + depth, sliding windows counted in positions; compacting keeps a path exactly."""
    checkpoint = Checkpoint(str(tiny_model_dir(family)))
    n_layers = checkpoint.config.num_hidden_layers
    head, tail = load_head(checkpoint, n_layers), None
    tail = load_tail(checkpoint, n_layers, head=head)
    torch.manual_seed(0)
    prefix = torch.randint(5, 90, (1, 20))  # longer than the tiny models' sliding window (16)
    parents = [-1, 0, 0, 1, 1, 2, 3, -1, 7]
    tokens = torch.randint(5, 90, (1, len(parents)))

    def logits(ids, start, tree=None):
        hidden = tail.stack.forward(head.forward(ids, start, tree), start, tree)
        return tail.lm_head(tail.norm(hidden))[0]

    logits(prefix, 0)
    tree_logits = logits(tokens, 20, parents)
    for node in range(len(parents)):
        path, j = [], node
        while j >= 0:
            path.insert(0, j)
            j = parents[j]
        chain = logits(tokens[:, path], 20)  # a chain step at 20 cuts the tree off first
        torch.testing.assert_close(tree_logits[node], chain[-1], atol=1e-4, rtol=0)
    logits(prefix, 0)
    logits(tokens, 20, parents)
    for stack in (head.stack, tail.stack):
        stack.compact(20, [0, 1, 3, 6])
    after = logits(tokens[:, :2], 24)
    whole = logits(torch.cat([prefix, tokens[:, [0, 1, 3, 6]], tokens[:, :2]], dim=1), 0)
    torch.testing.assert_close(after, whole[-2:], atol=1e-4, rtol=0)


def test_captures_read_tree_steps():
    """The audit's and the gateway's STEP reader skips the tree sections (it must not read them as tensors)."""
    from lambdasplit.wire.codecs import get_codec
    from lambdasplit.wire.frames import FRAME_HEADER, parse_step, parse_step_headers, step_frame

    hidden = torch.randn(1, 4, 8)
    raw = step_frame(17, [hidden], get_codec("fp32"), seq=3, keep=[0, 2], parents=[-1, 0, 0, 1])
    body = memoryview(raw)[FRAME_HEADER.size:]
    seq, position, headers = parse_step_headers(body)
    assert (seq, position, len(headers)) == (3, 17, 1)
    position, tensors = parse_step(body)
    assert position == 17 and torch.equal(tensors[0], hidden)
