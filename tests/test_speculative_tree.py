"""EAGLE tree drafting on the device (verified along its best path) and speculation with a lossy codec.

The tree: with width = branch = 1 it is exactly the greedy chain; wider trees hold the chain's
tokens' alternatives, each drafted with the head seeing only its own ancestors (checked against
running the head over each path alone); greedy output stays identical to plain split decoding.
Lossy codecs: verification compares against the logits the tail computes from what the codec
delivered, so greedy ids equal plain split decoding with the same codec.
"""

from __future__ import annotations

import pytest
import torch

from lambdasplit.client import DeviceModel, RemoteBody
from lambdasplit.llm import Checkpoint
from lambdasplit.server import BodyServer, BodyService
from lambdasplit.speculative import Draft
from lambdasplit.speculative.eagle import EagleHead, EagleSource, Tree, head_config

SPLIT = (2, 4)
PROMPT = "The quick brown fox jumps over the lazy dog and the quick brown fox keeps running"


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    folder = tiny_model_dir("llama")
    server = BodyServer([BodyService(str(folder), f"{SPLIT[0]}:{SPLIT[1]}")]).start_in_thread()
    device = DeviceModel.load(Checkpoint(str(folder)), SPLIT)
    yield device, server
    server.stop()


def _head(device, seed=0):
    torch.manual_seed(seed)
    head = EagleHead(head_config(device.checkpoint.config)).eval()
    for p in head.parameters():  # a random head drafts near-uniformly: sharpen it so the tree has structure
        p.data *= 3
    return head


def _generate(device, server, source=None, codec=None, **kw):
    prompt_ids = device.encode(PROMPT, chat=False)
    options = {"codec": codec} if codec else {}
    with RemoteBody.for_device(device, server.address, **options) as body:
        return device.generate(prompt_ids, body=body, keep_logits=True, speculate=source, max_new_tokens=16,
                               ignore_eos=True, **kw)


def _greedy_path(tree):
    """Tokens of the path that takes each node's most likely child, from the roots down."""
    node, tokens = -1, []
    while True:
        children = [i for i, p in enumerate(tree.parents) if p == node]
        if not children:
            return tokens
        node = max(children, key=lambda i: tree.scores[i])
        tokens.append(tree.tokens[node])


def test_tree_of_width_one_is_the_chain(llama):
    device, server = llama
    head = _head(device)
    chain = EagleSource(head, device.head.embed, device.tail)
    proposals = {}
    propose = chain.propose
    chain.propose = lambda sequence, k: proposals.setdefault(len(sequence), propose(sequence, k))
    tree = EagleSource(head, device.head.embed, device.tail, width=1, branch=1)
    narrow = EagleSource(head, device.head.embed, device.tail, width=1, branch=2)  # the tree code path
    narrow.trees = []
    narrow.verify_trees = False  # its best path, sent as a chain: what this test compares with the chain
    results = [_generate(device, server, s, draft_tokens=4) for s in (chain, tree, narrow)]
    assert results[0].token_ids == results[1].token_ids == results[2].token_ids
    assert results[0].drafted == results[1].drafted > 0
    checked = 0
    for length, t, path in narrow.trees:  # a width-1 tree expands the greedy chain, level by level
        if length in proposals:
            assert _greedy_path(t) == proposals[length].tokens
            checked += 1
        assert len(t.tokens) == 2 * max(t.depths) and len(path) == max(t.depths)
    assert checked > 0


def test_tree_nodes_see_only_their_ancestors(llama):
    """Every node's draft distribution equals the head run over its own path alone (a chain)."""
    device, _ = llama
    head = _head(device, seed=1)
    source = EagleSource(head, device.head.embed, device.tail, width=3, branch=2)
    prompt_ids = device.encode(PROMPT, chat=False)
    # the target's features for the prompt, as the tail would report them
    from lambdasplit.client.generation import StepModel

    model = StepModel(device.head.fork(), None, device.tail.fork())
    model.step(0, prompt_ids, last=1)
    feats = model.features
    sequence = prompt_ids + [int(torch.argmax(model.tail.lm_head(model.tail.norm(feats[-1]))))]
    source.features = {p: feats[p] for p in range(len(prompt_ids))}
    source.trees = []
    assert source.catch_up_seconds == 0.0
    draft = source.propose(sequence, 4)
    assert source.catch_up_seconds > 0.0  # the head read the prompt's features: auto leaves it out of the price
    (_, tree, path), = source.trees
    assert len(draft.tokens) == len(path) == 4 and len(tree.tokens) > 4
    assert len(set(tree.depths)) == 4 and tree.depths.count(1) == 2
    embed = device.head.embed
    # recomputed by causal chains: the head over the prompt, then the node's path, one position at a time
    with torch.inference_mode():
        for node in range(len(tree.tokens)):
            nodes = tree.path(node)
            tokens = [tree.tokens[i] for i in nodes]
            fed_feats, fed_tokens = feats[None, :len(sequence) - 1], sequence[1:]
            chain_feats, score = head(fed_feats, embed(torch.tensor([fed_tokens])))[:, -1:], 0.0
            for token in tokens:
                lp = torch.log_softmax(source._logits(chain_feats)[0, -1].float(), -1)
                score += float(lp[token])
                fed_feats = torch.cat([fed_feats, chain_feats], 1)
                fed_tokens = fed_tokens + [token]
                chain_feats = head(fed_feats, embed(torch.tensor([fed_tokens])))[:, -1:]
            assert score == pytest.approx(tree.scores[node], abs=1e-3), (node, nodes)


def test_tree_drafting_keeps_greedy_output_identical(llama):
    device, server = llama
    plain = _generate(device, server)
    for width, branch, k in ((3, 2, 4), (4, 4, "auto")):
        source = EagleSource(_head(device), device.head.embed, device.tail, width=width, branch=branch)
        result = _generate(device, server, source, draft_tokens=k)
        assert result.token_ids == plain.token_ids
        torch.testing.assert_close(torch.stack(result.logits), torch.stack(plain.logits), atol=1e-4, rtol=0)


def test_tree_accepted_by():
    tree = Tree(tokens=[5, 6, 7, 8], parents=[-1, -1, 0, 1], depths=[1, 1, 2, 2], scores=[-1, -2, -1.5, -2.5])
    assert tree.accepted_by([6, 8, 1]) == 2 and tree.accepted_by([5, 8]) == 1 and tree.accepted_by([9]) == 0
    assert tree.best_path() == [0, 2]


def test_tree_graft_adds_a_path_sharing_its_prefix():
    tree = Tree(tokens=[5, 6, 7], parents=[-1, -1, 0], depths=[1, 1, 2], scores=[-1.0, -2.0, -1.5])
    tree.graft([5, 7, 9])  # 5 -> 7 exists: only 9 is new, under node 2
    assert tree.tokens == [5, 6, 7, 9] and tree.parents == [-1, -1, 0, 2] and tree.depths == [1, 1, 2, 3]
    assert tree.scores[3] == -1.5 and tree.accepted_by([5, 7, 9, 1]) == 3
    tree.graft([8, 5])  # a new root and its child; nodes stay parents-first
    assert tree.tokens[4:] == [8, 5] and tree.parents[4:] == [-1, 4] and tree.depths[4:] == [1, 2]
    assert all(p < i for i, p in enumerate(tree.parents))
    before = list(tree.tokens)
    assert tree.graft([6]).tokens == before and Tree().graft([]).tokens == []


def test_eagle_lookup_grafts_the_lookup_continuation(llama):
    """eagle+lookup's tree holds the head's best k nodes and lookup's k tokens as a path."""
    from lambdasplit.speculative.sources import lookup_continuation, make_source

    device, _ = llama
    source = EagleSource(_head(device), device.head.embed, device.tail, width=4, branch=4, lookup=True)
    assert source.name == "eagle+lookup" and source.verify_trees
    sequence = [3, 4, 5, 6, 3, 4]
    chain = lookup_continuation(sequence, 3)
    assert chain == [5, 6, 3]
    tree = source.propose_tree(sequence, 3)  # the head has no features yet: lookup's path alone
    assert tree.tokens == chain and tree.parents == [-1, 0, 1]
    with pytest.raises(Exception, match="no draft head|no EAGLE"):
        make_source("eagle+lookup", device, draft_model="/nonexistent")


class TruthSource:
    """Drafts the plain run's tokens with every third one wrong: acceptance and rejection at known places."""

    name = "truth"

    def __init__(self, prompt_len, truth):
        self.prompt_len, self.truth = prompt_len, truth

    def propose(self, sequence, k):
        done = len(sequence) - self.prompt_len
        tokens = list(self.truth[done:done + k])
        return Draft([t if (done + i) % 3 else (t + 1) % 100 for i, t in enumerate(tokens)])

    def observe(self, sequence, step):
        pass


@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_lossy_codec_speculation_equals_plain_with_the_same_codec(llama, codec):
    device, server = llama
    plain = _generate(device, server, codec=codec)
    exact = _generate(device, server)
    prompt_len = len(device.encode(PROMPT, chat=False))
    spec = _generate(device, server, TruthSource(prompt_len, plain.token_ids), codec=codec, draft_tokens=4)
    assert spec.accepted > 0 and spec.drafted > spec.accepted
    assert spec.token_ids == plain.token_ids
    # what the tail saw went through the codec: the logits differ from the lossless run's by far more than 1e-4
    # (so the comparison above is against the codec's own output), and equal plain decoding's with the codec
    lossy, lossless = torch.stack(plain.logits), torch.stack(exact.logits)
    finite = torch.isfinite(lossless)  # special tokens masked to -inf in both
    assert (lossy[finite] - lossless[finite]).abs().max() > 1e-3
    torch.testing.assert_close(torch.stack(spec.logits), torch.stack(plain.logits), atol=2e-3, rtol=0)


def test_bench_wan_tiny_eagle_tree(capsys, tiny_model_dir, tmp_path):
    """`bench wan` with the eagle sources (an untrained head saved for the tiny model) and the tree oracle."""
    import json

    from lambdasplit.cli import main

    folder = str(tiny_model_dir("llama"))
    device = DeviceModel.load(folder)
    head_dir = tmp_path / "head"
    _head(device).save(head_dir, {"target": folder, "target_fingerprint": device.checkpoint.fingerprint})
    out = tmp_path / "wan"
    assert main(["bench", "wan", "--model", folder, "--delays", "5", "--presets", "", "--prompts", "1",
                 "--new-tokens", "8", "--sources", "eagle,eagle-tree,eagle+lookup", "--draft-model", str(head_dir),
                 "--out", str(out), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    rows = json.loads((out / "table.json").read_text())
    assert [r["speculate"] for r in rows] == ["none", "eagle", "eagle-tree", "eagle+lookup"]
    assert all(r["same_ids"] is True and r["drafted_positions"] > 0 for r in rows[1:])
    tree = json.loads((out / "tree.json").read_text())
    assert printed["tree"] == tree and tree["rounds"] > 0 and tree["nodes_per_tree"] > tree["depth"]
    # the path sent and the greedy chain are paths of the tree: the whole tree accepts at least as much
    assert tree["tokens_per_round_trip_tree"] >= max(tree["tokens_per_round_trip_path"],
                                                     tree["tokens_per_round_trip_chain"]) >= 1.0
    assert "eagle-tree" in (out / "table.md").read_text()
