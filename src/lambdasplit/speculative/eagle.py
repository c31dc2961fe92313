"""`--speculate eagle`: a feature-level draft head on the device (after EAGLE, Li et al. 2024).

The tail already holds the last decoder layer's output (the features, before the final
norm) of every position it verifies. The head predicts the next position's features
from this position's features and the next token's embedding:

    f^_{t+1} = layer(fc([embed(x_{t+1}); f_t]))        one decoder layer with its own KV cache
    logits_{t+1} = lm_head(final_norm(f^_{t+1}))        the target's own norm and LM head

and drafts autoregressively from its own predictions. A head trained with a draft
vocabulary (EAGLE-3's) drafts only from those tokens, plus every token of the sequence it
drafts for (so a prompt's rare words can be copied): the LM head over that subset costs a
fraction of the whole vocabulary's. The target verifies over its whole vocabulary, so the
output is unchanged; a token outside the subset is simply never drafted. Only `fc` and the layer are
trained (zoo/draft_train.py, `lambdasplit zoo train smollm2-draft`); the embedding, norm
and LM head are the device's, so the head adds a few MB to the device, nothing to the
server, and sees nothing the device does not already hold.

Drafting builds EAGLE-2's tree on the device (`draft_tree`: at each depth the `width`
nodes of highest cumulative draft probability are expanded into their `branch` most likely
children, all in one forward of the head with a tree attention mask over its own cache),
then sends the one root-to-node path that maximizes the expected accepted length (the sum
of its prefixes' draft probabilities) as an ordinary chain step: protocol v1 verifies
chains, and a whole tree in one round trip needs the STEP `parents` field specified in
docs/speculative.md. `tree_oracle` says what that would add (what the target accepts from
the best path of the tree vs from the chain sent), which `bench wan` measures.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from lambdasplit.errors import UsageError
from lambdasplit.speculative.sources import Draft, Step, lookup_continuation

BUNDLED = Path(__file__).resolve().parent.parent / "zoo" / "data" / "smollm2_draft"
WEIGHTS, CONFIG = "draft_head.safetensors", "draft_head.json"


def head_config(target_config, intermediate_size: int | None = None) -> LlamaConfig:
    """The head's one Llama layer, sized like the target's layers (hidden size, heads)."""
    d = target_config.hidden_size
    heads = getattr(target_config, "num_attention_heads", None) or 8
    kv = getattr(target_config, "num_key_value_heads", None) or heads
    return LlamaConfig(hidden_size=d, intermediate_size=intermediate_size or 2 * d, num_attention_heads=heads,
                       num_key_value_heads=kv, head_dim=d // heads, num_hidden_layers=1,
                       rms_norm_eps=getattr(target_config, "rms_norm_eps", 1e-5),
                       rope_theta=float(getattr(target_config, "rope_theta", None) or 10000.0),
                       max_position_embeddings=getattr(target_config, "max_position_embeddings", 8192),
                       vocab_size=1, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                       attn_implementation="sdpa")  # no tokens of its own: the target's embedding and LM head


def causal_mask(queries: int, past: int) -> torch.Tensor:
    """Additive [1, 1, q, past + q] mask: query i (at position past + i) sees keys 0 .. past + i."""
    return torch.full((queries, past + queries), float("-inf")).triu(past + 1)[None, None]


class EagleHead(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        config._attn_implementation = config._attn_implementation or "sdpa"  # not kept by to_dict()
        self.config = config
        d = config.hidden_size
        self.fc = nn.Linear(2 * d, d, bias=False)
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, features: torch.Tensor, embeddings: torch.Tensor, start: int = 0,
                cache: DynamicCache | None = None) -> torch.Tensor:
        """features, embeddings: [B, n, D] for positions start .. start + n - 1 -> predicted next features."""
        hidden = self.fc(torch.cat([embeddings, features], dim=-1))
        n = hidden.shape[1]
        positions = torch.arange(start, start + n).unsqueeze(0)
        out = self.layer(hidden, attention_mask=causal_mask(n, start), position_ids=positions,
                         past_key_values=cache, use_cache=cache is not None,
                         position_embeddings=self.rotary(hidden, positions))
        return out[0] if isinstance(out, tuple) else out

    def save(self, folder: Path, meta: dict) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("rotary.")},
                  str(folder / WEIGHTS))
        (folder / CONFIG).write_text(json.dumps({"config": self.config.to_dict(), **meta}, indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> tuple["EagleHead", dict]:
        from safetensors.torch import load_file

        meta = json.loads((folder / CONFIG).read_text())
        config = LlamaConfig(**meta["config"])
        head = cls(config)
        head.load_state_dict(load_file(str(folder / WEIGHTS)), strict=False)
        return head.eval(), meta


def default_head_folder() -> Path | None:
    """The bundled head, else one trained into the cache by `zoo train smollm2-draft`."""
    from lambdasplit.zoo.registry import cache_dir

    for folder in (BUNDLED, cache_dir() / "smollm2-draft"):
        if (folder / WEIGHTS).exists():
            return folder
    return None


@dataclass
class Tree:
    """Drafted candidates, flattened parents-first: node i is `tokens[i]` after node `parents[i]` (-1: after
    the committed sequence), at depth `depths[i]` (1 for the roots), with draft log-probability `scores[i]`
    of its whole path."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def path(self, node: int) -> list[int]:
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def best_path(self) -> list[int]:
        """Node indices of the path maximizing the expected accepted length: sum of exp(score) over its nodes."""
        if not self.tokens:
            return []
        value = []
        for i, parent in enumerate(self.parents):
            value.append(math.exp(self.scores[i]) + (value[parent] if parent >= 0 else 0.0))
        return self.path(max(range(len(value)), key=value.__getitem__))

    def top(self, budget: int) -> "Tree":
        """The `budget` nodes of highest path score, parents first: the subtree that maximizes the expected
        accepted length under the draft's own probabilities for that many positions. A child's score is
        its parent's plus a log-probability <= 0, and ties go to the earlier index (parents come first),
        so the chosen set holds every chosen node's ancestors."""
        kept = sorted(sorted(range(len(self.tokens)), key=lambda i: (-self.scores[i], i))[:max(0, budget)])
        index = {node: i for i, node in enumerate(kept)}
        return Tree(tokens=[self.tokens[i] for i in kept],
                    parents=[index[self.parents[i]] if self.parents[i] >= 0 else -1 for i in kept],
                    depths=[self.depths[i] for i in kept], scores=[self.scores[i] for i in kept])

    def children(self) -> dict[int, dict[int, int]]:
        """parent node (-1: the committed sequence) -> {token: its first child node drafting that token}."""
        children: dict[int, dict[int, int]] = {}
        for i, (token, parent) in enumerate(zip(self.tokens, self.parents)):
            children.setdefault(parent, {}).setdefault(token, i)
        return children

    def graft(self, chain: list[int]) -> "Tree":
        """This tree with `chain` (tokens after the committed sequence) added as a path: the nodes it
        shares with the tree are reused, the rest appended parents-first, each with its parent's score."""
        children = self.children()
        node = -1
        for depth, token in enumerate(chain, 1):
            child = children.get(node, {}).get(token)
            if child is None:
                child = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self.depths.append(depth)
                self.scores.append(self.scores[node] if node >= 0 else 0.0)
                children.setdefault(node, {})[token] = child
            node = child
        return self

    def accepted_by(self, truth: list[int]) -> int:
        """How many tokens of `truth` (the target's own continuation) the deepest matching path covers:
        what verifying the whole tree in one step would accept (greedy)."""
        node, depth = -1, 0
        children = self.children()
        while depth < len(truth) and truth[depth] in children.get(node, {}):
            node = children[node][truth[depth]]
            depth += 1
        return depth


class EagleSource:

    def __init__(self, head: EagleHead, embed, tail, width: int = 1, branch: int = 1,
                 vocab: list[int] | None = None, lookup: bool = False):
        """width = branch = 1: a greedy chain; wider: EAGLE-2's tree, verified along its best path.
        vocab: the token ids the head drafts from (None: the whole vocabulary).
        lookup: a verified tree also holds prompt lookup's continuation as a path (eagle+lookup)."""
        self.head, self.embed, self.tail = head, embed, tail
        self.lookup = lookup
        self.vocab = list(vocab) if vocab is not None else None
        if self.vocab is not None:
            self._members = set(self.vocab)
            self._vocab_ids = torch.tensor(self.vocab)
            self._vocab_weight = tail.lm_head.weight.detach()[self._vocab_ids]
        self.width, self.branch = max(1, width), max(1, branch)
        self.name = "eagle" if self.width == self.branch == 1 else "eagle+lookup" if lookup else "eagle-tree"
        # a tree is verified whole where the decoding allows (greedy, a server taking tree steps);
        # False: only its best path, as a chain
        self.verify_trees = self.name != "eagle"
        self.trees: list[tuple[int, Tree, list[int]]] | None = None  # set to [] to record (length, tree, path sent)
        self.cache = DynamicCache(config=head.config)
        self.fed = 0  # pairs (f_t, x_{t+1}) in the head's cache, t = 0 .. fed - 1
        self.features: dict[int, torch.Tensor] = {}  # target features of committed positions not yet fed
        self.last_prediction: torch.Tensor | None = None  # the head's output at the last fed pair
        self.catch_up_seconds = 0.0  # the latest catch-up's head forward (the first one reads the whole prompt)

    @classmethod
    def load(cls, folder: str | None, device, width: int = 1, branch: int = 1, lookup: bool = False) -> "EagleSource":
        path = Path(folder) if folder else default_head_folder()
        if path is None or not (path / WEIGHTS).exists():
            raise UsageError("no EAGLE draft head for this model: train one with `lambdasplit zoo train smollm2-draft` "
                             "(or pass --draft-model FOLDER)" if folder is None else f"no draft head in {folder}")
        head, meta = EagleHead.load(path)
        if device is not None and meta.get("target_fingerprint") not in (None, device.checkpoint.fingerprint):
            raise UsageError(f"the draft head in {path} was trained for another model "
                             f"({meta.get('target')}); train one for this model")
        return cls(head, device.head.embed, device.tail, width=width, branch=branch, vocab=meta.get("draft_vocab"),
                   lookup=lookup)

    def _logits(self, features: torch.Tensor) -> torch.Tensor:
        """The target's logits for the head's predicted features, over the draft vocabulary (index i is
        token self._token(i))."""
        tail = self.tail
        normed = tail.norm(features)
        if self.vocab is None:
            return tail.family.logits(tail.config, tail.lm_head(normed))
        bias = getattr(tail.lm_head, "bias", None)
        bias = bias[self._vocab_ids] if bias is not None else None
        return tail.family.logits(tail.config, torch.nn.functional.linear(normed, self._vocab_weight, bias))

    def _token(self, index: int) -> int:
        return self.vocab[index] if self.vocab is not None else index

    def _add_sequence_tokens(self, sequence: list[int]) -> None:
        """Let the head draft any token already in the sequence (prompt or answer), not only its vocabulary's."""
        if self.vocab is None:
            return
        missing = sorted(set(sequence) - self._members)
        if missing:
            self.vocab += missing
            self._members.update(missing)
            extra = torch.tensor(missing)
            self._vocab_ids = torch.cat([self._vocab_ids, extra])
            self._vocab_weight = torch.cat([self._vocab_weight, self.tail.lm_head.weight.detach()[extra]])

    def _cut(self, length: int) -> None:
        extra = self.cache.get_seq_length() - length
        if extra > 0:
            self.cache.crop(-extra)  # transformers 5: a negative count removes that many positions

    def _catch_up(self, sequence: list[int]) -> bool:
        """Feed the committed pairs the head has not seen yet; False when it cannot draft."""
        self.catch_up_seconds = 0.0  # never a stale figure, whatever this call does
        last = len(sequence) - 2  # the last position the target has processed (its features are known)
        if last < 0 or not all(p in self.features for p in range(self.fed, last + 1)):
            return False
        self._add_sequence_tokens(sequence)
        self._cut(self.fed)
        if self.fed <= last:
            began = time.perf_counter()
            feats = torch.stack([self.features.pop(p) for p in range(self.fed, last + 1)])[None]
            tokens = torch.tensor([sequence[self.fed + 1:last + 2]])
            predicted = self.head(feats, self.embed(tokens), self.fed, self.cache)[:, -1:]
            self.fed = last + 1
            self.last_prediction = predicted
            self.catch_up_seconds = time.perf_counter() - began
        return self.last_prediction is not None

    @torch.inference_mode()
    def propose_tree(self, sequence: list[int], k: int) -> Tree:
        """eagle-tree with whole-tree verification: the best k-node subtree of a k-level EAGLE-2 tree;
        eagle+lookup adds prompt lookup's k-token continuation to it as one more path (up to 2k nodes:
        the head drafts new text, lookup copies text the prompt or the answer already holds)."""
        if k <= 0:
            return Tree()
        tree = Tree()
        if self._catch_up(sequence):
            tree = self.draft_tree(k).top(k)
            self._cut(self.fed)
        return tree.graft(lookup_continuation(sequence, k)) if self.lookup else tree

    @torch.inference_mode()
    def propose(self, sequence: list[int], k: int) -> Draft:
        if k <= 0 or not self._catch_up(sequence):
            return Draft()
        if self.width == 1 and self.branch == 1:
            drafts = self._chain(k)
        else:
            tree = self.draft_tree(k)
            path = tree.best_path()
            if self.trees is not None:
                self.trees.append((len(sequence), tree, path))
            drafts = [tree.tokens[i] for i in path]
        self._cut(self.fed)
        return Draft(drafts)

    def _chain(self, k: int) -> list[int]:
        predicted, drafts = self.last_prediction, []
        for i in range(k):
            token = self._token(int(torch.argmax(self._logits(predicted)[0, -1])))
            drafts.append(token)
            if i + 1 < k:
                predicted = self.head(predicted, self.embed(torch.tensor([[token]])), self.fed + i, self.cache)
        return drafts

    def draft_tree(self, depth: int) -> Tree:
        """EAGLE-2's dynamic tree, `depth` levels: expand the `width` best nodes of each level into their
        `branch` best children; one head forward per level (tree mask over the head's cache)."""
        tree = Tree()
        frontier = [-1]  # nodes whose children are drafted next; -1 is the committed sequence
        predicted = self.last_prediction[0, -1:]  # [len(frontier), D]: each frontier node's predicted features
        for level in range(depth):
            log_probs = torch.log_softmax(self._logits(predicted).float(), -1)
            top = torch.topk(log_probs, self.branch, dim=-1)
            candidates = []
            for row, parent in enumerate(frontier):
                base = tree.scores[parent] if parent >= 0 else 0.0
                for lp, index in zip(top.values[row].tolist(), top.indices[row].tolist()):
                    candidates.append((base + lp, parent, self._token(index), row))
            candidates.sort(key=lambda c: -c[0])
            kept = candidates[:self.width * self.branch] if level else candidates  # every root child
            new, rows = [], []
            for score, parent, token, row in kept:
                new.append(len(tree.tokens))
                rows.append(row)
                tree.tokens.append(token)
                tree.parents.append(parent)
                tree.depths.append(level + 1)
                tree.scores.append(score)
            if level + 1 == depth:
                break
            frontier = sorted(new, key=lambda i: -tree.scores[i])[:self.width]
            # the head's cache holds the committed pairs (fed) and the tree nodes fed so far, in tree order
            past = self.fed
            inputs = predicted[[rows[new.index(i)] for i in frontier]]
            embeddings = self.embed(torch.tensor([[tree.tokens[i] for i in frontier]]))
            predicted = self._tree_forward(tree, frontier, inputs[None], embeddings, past)[0]
        return tree

    def _tree_forward(self, tree: Tree, nodes: list[int], features, embeddings, past: int):
        """The head over tree `nodes` (each at position fed + depth - 1), seeing its ancestors among the
        nodes already in the head's cache (self._slots) and itself."""
        if past == self.cache.get_seq_length():
            self._slots = {}
        slots = self._slots
        start = self.cache.get_seq_length()
        for i, node in enumerate(nodes):
            slots[node] = start + i
        mask = torch.full((len(nodes), start + len(nodes)), float("-inf"))
        mask[:, :past] = 0.0
        for row, node in enumerate(nodes):
            while node >= 0:
                if node in slots:
                    mask[row, slots[node]] = 0.0
                node = tree.parents[node]
        hidden = self.head.fc(torch.cat([embeddings, features], dim=-1))
        positions = torch.tensor([[past + tree.depths[n] - 1 for n in nodes]])
        out = self.head.layer(hidden, attention_mask=mask[None, None], position_ids=positions,
                              past_key_values=self.cache, use_cache=True,
                              position_embeddings=self.head.rotary(hidden, positions))
        return out[0] if isinstance(out, tuple) else out

    def observe(self, sequence: list[int], step: Step) -> None:
        processed = len(sequence) - 1  # positions now committed in the target's caches
        features = step.features
        first = step.start + len(step.inputs) - features.shape[0]
        for i in range(features.shape[0]):
            position = first + i
            if position < processed:
                self.features[position] = features[i]
