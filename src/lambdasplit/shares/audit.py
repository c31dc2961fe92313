"""What each shares server holds after real sessions, and what the audit's attacks get from it.

Sessions run through the two real servers with the transport's capture on (TLS off: the
worst case); each server's capture is parsed into its requests exactly as the server reads
them. Three views of the same sessions are attacked with the same attacks:

    server 0   the shares it received (x - r) and the answers it sent (W (x - r) + b)
    server 1   its shares r (it expands them itself from the key in its capture) and W r
    plain      what a single server doing the same offload without masks would have held:
               the device's true inputs x and outputs W x + b (recorded on the device)

Attacks (public weights, the audit's threat model):

    inversion     white-box: the first shared layer's input at position p is the public
                  layer-0 norm of the public embedding of token p, whatever came before
                  (rotary families): nearest row of that vocabulary table, top-1
    probe         learned: a ridge linear map from the view's layer-0 inputs back to token
                  embeddings (audit/attacks.fit_probe), fitted on the attacker's own sessions
                  with known text, scored on the victims' sessions
    public tail   the downlink: argmax of the LM head's answer is the generated token

Statistics on server 0's received shares: chi-square of their bytes against uniform,
two-sample KS of the share words of two different prompts, the fraction of identical words
when the same prompt is run twice, and the correlation of shares with the true inputs.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from lambdasplit.audit.attacks import fit_probe, nearest_embeddings
from lambdasplit.audit.capture import split_frames
from lambdasplit.client.generation import Sampling
from lambdasplit.shares import ring
from lambdasplit.shares.device import SharedDevice
from lambdasplit.shares.service import PLAN_COUNT, PLAN_MARK, REQUEST_HEAD, RESULT_HEAD, ROWS
from lambdasplit.wire.frames import FrameType


def parse_capture(chunks: list[tuple[str, bytes]]) -> tuple[list[dict], list[np.ndarray]]:
    """A server's capture -> its requests ({indices, rows, payload}) and its answers (uint64 words)."""
    requests, answers = [], []
    for direction, out in (("up", requests), ("down", answers)):
        stream = b"".join(data for d, data in chunks if d == direction)
        for frame_type, body in split_frames(stream):
            if direction == "up" and frame_type == FrameType.STEP:
                seq, count = REQUEST_HEAD.unpack_from(body, 0)
                offset = REQUEST_HEAD.size
                if count == PLAN_MARK:  # share 1's PLAN: one entry per request it stands for
                    (rows,) = ROWS.unpack_from(body, offset)
                    (planned,) = PLAN_COUNT.unpack_from(body, offset + ROWS.size)
                    offset += ROWS.size + PLAN_COUNT.size
                    for j in range(planned):
                        (k,) = PLAN_COUNT.unpack_from(body, offset)
                        indices = list(np.frombuffer(body[offset + 2:offset + 2 + 2 * k], dtype="<u2"))
                        offset += 2 + 2 * k
                        out.append({"seq": seq + j, "indices": indices, "rows": rows, "payload": b""})
                    continue
                indices = list(np.frombuffer(body[offset:offset + 2 * count], dtype="<u2"))
                offset += 2 * count
                (rows,) = ROWS.unpack_from(body, offset)
                out.append({"seq": seq, "indices": indices, "rows": rows, "payload": bytes(body[offset + ROWS.size:])})
            elif direction == "down" and frame_type == FrameType.RESULT:
                payload = bytes(body[RESULT_HEAD.size:])  # the first answer is the describe request's JSON
                out.append(np.frombuffer(payload, dtype="<u8") if out else payload)
    return requests, answers


class Session:
    """One captured generation: the truth, both servers' requests and answers, the device's plain values."""

    def __init__(self, device: SharedDevice, servers: list[str], prompt: str, max_new_tokens: int):
        captures = [[], []]
        plain: list[tuple[list[int], np.ndarray, np.ndarray]] = []
        pair = device.connect(servers, captures=captures)
        pair.observer = lambda indices, x_ring, y: plain.append((list(indices), x_ring.copy(), y.copy()))
        try:
            result = device.generate(prompt, body=device.body(), max_new_tokens=max_new_tokens,
                                     sampling=Sampling(), ignore_eos=True)
        finally:
            pair.close()
        self.prompt, self.prompt_ids, self.token_ids = prompt, list(result.prompt_ids), list(result.token_ids)
        self.table = pair.table
        self.views = {}
        (req0, ans0), (req1, ans1) = parse_capture(captures[0]), parse_capture(captures[1])
        key = req1[0]["payload"]  # server 1's describe request carries the mask key: it holds it
        masks = ring.MaskStream(key)
        in_width = [layer["in"] for layer in self.table]
        s0 = [np.frombuffer(r["payload"], dtype="<u8") for r in req0[1:]]
        s1 = [masks.next(r["rows"] * in_width[r["indices"][0]]) for r in req1[1:]]
        indices = [r["indices"] for r in req0[1:]]
        self.views["server 0"] = (indices, s0, ans0[1:])
        self.views["server 1"] = (indices, s1, ans1[1:])
        self.views["plain"] = ([p[0] for p in plain], [p[1] for p in plain], [p[2] for p in plain])
        self.server0_words = np.concatenate(s0)

    @property
    def fed_tokens(self) -> list[int]:
        """The tokens whose layer-0 inputs went out, in order: every position but the last generated."""
        return (self.prompt_ids + self.token_ids)[:-1]

    def layer0_inputs(self, view: str, first_index: int, width: int) -> torch.Tensor:
        indices, ups, _ = self.views[view]
        rows = [ring.decode(up, ring.FRAC_X).reshape(-1, width) for ix, up in zip(indices, ups) if ix[0] == first_index]
        return torch.from_numpy(np.concatenate(rows)).float()

    def lm_head_outputs(self, view: str, lm_index: int) -> torch.Tensor:
        indices, _, downs = self.views[view]
        return torch.stack([torch.from_numpy(ring.decode(d, ring.FRAC_Y)).float()
                            for ix, d in zip(indices, downs) if ix == [lm_index]])


@torch.inference_mode()
def vocabulary_table(device: SharedDevice) -> torch.Tensor:
    """[V, D] the first shared layer's input for every token at position 0 (public weights)."""
    ids = torch.arange(device.checkpoint.config.vocab_size)[:, None]
    hidden = device.head.fork().forward(ids, 0)
    layer0 = device.stack.layers[0]
    norm = getattr(layer0, "input_layernorm", None) or getattr(layer0, "ln_1")
    return norm(hidden)[:, 0].float()


def _top1(predicted: torch.Tensor, truth: list[int]) -> float:
    return float((predicted[:len(truth)] == torch.tensor(truth)).float().mean())


def audit_shares(device: SharedDevice, servers: list[str], *, prompts: list[str], attacker_prompts: list[str],
                 max_new_tokens: int = 8) -> dict:
    """Run the sessions, attack each view, run the statistical tests; one report dict."""
    victims = [Session(device, servers, p, max_new_tokens) for p in prompts]
    own = [Session(device, servers, p, max_new_tokens) for p in attacker_prompts]
    repeat = Session(device, servers, prompts[0], max_new_tokens)
    table = victims[0].table
    first = 0  # the first shared layer (layer 0's q/k/v or fused projection)
    width = table[first]["in"]
    lm_index = len(table) - 1 if table[-1]["name"] == device.stack.family.lm_head else None
    vocab = vocabulary_table(device)
    embed = device.head.embed.weight
    truth = [t for s in victims for t in s.fed_tokens]
    attacks = {}
    for view in ("server 0", "server 1", "plain"):
        observed = torch.cat([s.layer0_inputs(view, first, width) for s in victims])
        finite = torch.nan_to_num(observed, nan=0.0, posinf=0.0, neginf=0.0)
        inversion = torch.cdist(finite.double(), vocab.double()).argmin(dim=1)
        train_x = torch.cat([s.layer0_inputs(view, first, width) for s in own])
        train_y = torch.tensor([t for s in own for t in s.fed_tokens])
        probe = fit_probe(torch.nan_to_num(train_x), train_y, embed)
        probed = nearest_embeddings(embed, finite, 1, probe)[:, 0]
        row = {"inversion_top1": _top1(inversion, truth), "probe_top1": _top1(probed, truth), "positions": len(truth)}
        if lm_index is not None:
            outputs = torch.cat([s.lm_head_outputs(view, lm_index) for s in victims])
            generated = [t for s in victims for t in s.token_ids]
            row["public_tail_top1"] = _top1(outputs.argmax(dim=-1), generated)
        attacks[view] = row
    counts = np.bincount(np.concatenate([s.server0_words for s in victims]).view(np.uint8), minlength=256)
    a, b = victims[0].server0_words, victims[1 % len(victims)].server0_words
    n = min(len(a), len(b), len(repeat.server0_words))
    plain_x = np.concatenate([x.ravel() for x in victims[0].views["plain"][1]])
    share_x = victims[0].server0_words
    m = min(len(plain_x), len(share_x))
    values = max(1, len(set(truth)))
    most_common = max(truth.count(t) for t in set(truth)) / len(truth)
    return {
        "prompts": len(prompts), "attacker_prompts": len(attacker_prompts), "new_tokens": max_new_tokens,
        "vocab_size": int(vocab.shape[0]), "distinct_tokens": values,
        "chance": {"uniform": 1 / vocab.shape[0], "most_common_token": most_common},
        "attacks": attacks,
        "stats": {
            "byte_chi2_p": float(stats.chisquare(counts).pvalue), "bytes": int(counts.sum()),
            "two_prompts_ks_p": float(stats.ks_2samp(a.astype(np.float64), b.astype(np.float64)).pvalue),
            "same_prompt_equal_words": float(np.mean(victims[0].server0_words[:n] == repeat.server0_words[:n])),
            "share_vs_input_correlation": float(np.corrcoef(plain_x[:m].view(np.int64).astype(np.float64),
                                                            share_x[:m].view(np.int64).astype(np.float64))[0, 1]),
        },
    }
