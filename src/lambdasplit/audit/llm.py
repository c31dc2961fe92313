"""`lambdasplit audit llm`: real captured sessions at several split depths, every attack, scored.

For each split X:(N-X) the device runs greedy sessions (EOS masked: exactly G new tokens)
against a BodyServer on loopback, with the transport's capture on (TLS off). Then:

    uplink    positions   prompt = the user's own text inside the chat template
                          generated = the generated tokens that went up at the next step
    downlink  positions   prompt = the state at prompt position p, target token p + 1
                          generated = the state that yields generated token g, target g

Attacks (attacks.py, inverters.py) under three threat models, a unigram guessing
baseline, and, for each defense, the same attacks plus its utility cost (greedy
agreement with the undefended output, perplexity on held-out public text).

Reproducibility: the defended sessions here use a fixed noise seed (`seed`) so that a
report can be rerun; a real `generate --defense` draws a secret seed (defenses.py). The
attacker does not use the seed. Under a defense the exact inversion gets no
full-vocabulary sweep budget (only the rankers' candidates are tried): see `meta`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field

import torch

from lambdasplit.audit import attacks, inverters
from lambdasplit.audit.capture import Transcript, int_runs, run_session
from lambdasplit.audit.defenses import NoDefense, parse_defense
from lambdasplit.client.device import DeviceModel
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.llm.segments import load_body, load_head, load_tail
from lambdasplit.server import BodyServer
from lambdasplit.server.services import BodyService, CloudService

DEFAULT_DEFENSES = [
    "gaussian:nsr=0.25,clip=auto", "gaussian:nsr=1,clip=auto", "gaussian:nsr=3,clip=auto",
    "dpquant:bits=4,epsilon=8,clip=auto", "dpquant:bits=4,epsilon=4,clip=auto", "dpquant:bits=4,epsilon=2,clip=auto",
]


def default_prompts() -> list[str]:
    return json.loads(inverters.shipped_text("prompts.json"))["prompts"]


# An epoch of the GRU is ~20 optimizer steps (one sample is a whole sequence), of the MLP
# ~65 (one sample is a position): the GRU gets 3x the epochs. Measured on SmolLM2 at X=2
# and X=8 (held-out KJV text): 6 epochs of batch 32 gave 57% / 54% top-1, 12 of batch 8
# gave 79% / 76%, 20 of batch 4 no better. Undertrained, it would understate the risk.
GRU_EPOCH_FACTOR = 3


@dataclass
class LLMAuditConfig:
    model: str
    splits: list[int]  # head depths X; the tail gets the matching depth (Y = N - X)
    codec: str = "fp16"
    prompts: list[str] = field(default_factory=default_prompts)
    max_new_tokens: int = 16
    defenses: list[str] = field(default_factory=list)  # audited at defense_split
    defense_split: int | None = None  # default: the smallest X
    defense_prompts: int = 6  # sessions per defense (utility and privacy)
    # The next three are also the CLI's defaults (audit/commands.py), the settings docs/privacy.md measured.
    train_tokens: int = 8000  # public text tokens for the learned inverters
    epochs: int = 4
    sweep_budget_s: float = 40.0  # per split, for full-vocabulary sweeps of the exact inversion (0 under defenses)
    proposals: int = 64  # candidates from each cheap ranker (linear probe, MLP) for the exact inversion
    perplexity_tokens: int = 256
    cloud_check: bool = True
    lens_sequences: int = 40  # public sequences run through every layer to fit the tuned lens
    seed: int = 0


class Scores:
    """Accumulates per-session hits into top-1 / top-5 / exact-match fractions."""

    def __init__(self):
        self.rows: dict[tuple, dict] = {}

    def add(self, key: tuple, top5: torch.Tensor, truth: torch.Tensor, extra: dict | None = None) -> None:
        if len(truth) == 0:
            return
        row = self.rows.setdefault(key, {"hits1": 0, "hits5": 0, "n": 0, "exact": 0, "sessions": 0, **(extra or {})})
        hit1 = top5[:, 0] == truth
        row["hits1"] += int(hit1.sum())
        row["hits5"] += int((top5 == truth[:, None]).any(dim=1).sum())
        row["n"] += len(truth)
        row["exact"] += int(bool(hit1.all()))
        row["sessions"] += 1

    def results(self, keys: tuple[str, ...]) -> list[dict]:
        out = []
        for key, row in self.rows.items():
            record = dict(zip(keys, key))
            record.update(top1=row["hits1"] / row["n"], top5=row["hits5"] / row["n"], exact_match=row["exact"] / row["sessions"],
                          tokens=row["n"], sessions=row["sessions"])
            record.update({k: v for k, v in row.items() if k not in ("hits1", "hits5", "n", "exact", "sessions")})
            out.append(record)
        return out


KEYS = ("split", "direction", "positions", "attack", "threat_model", "defense")


def _targets(t: Transcript) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(direction, positions) -> (indices into the captured states, true tokens)."""
    seq = torch.tensor(t.sequence)
    p, g = len(t.prompt_ids), len(t.token_ids)
    a, b = t.content
    up_prompt = torch.arange(a, b)
    up_generated = torch.arange(p, p + g - 1)  # the last generated token never goes up
    down_prompt = torch.arange(max(a - 1, 0), b - 1)  # states whose next token is the user's text
    down_generated = torch.arange(p - 1, p + g - 1)
    return {
        ("uplink", "prompt"): (up_prompt, seq[up_prompt]),
        ("uplink", "generated"): (up_generated, seq[up_generated]),
        ("downlink", "prompt"): (down_prompt, seq[down_prompt + 1]),
        ("downlink", "generated"): (down_generated, seq[down_generated + 1]),
    }


def _eavesdrop(scores: Scores, split: str, t: Transcript, defense: str) -> None:
    """Text and token-id runs in the raw bytes of each direction."""
    user_text = t.prompt
    for direction, stream in (("uplink", t.stream("up")), ("downlink", t.stream("down"))):
        for positions, text, ids in (("prompt", user_text, t.prompt_ids[t.content[0]:t.content[1]]),
                                     ("generated", t.text, t.token_ids)):
            seen = attacks.visible_text(stream, text)
            key = (split, direction, positions, "utf8-substrings", "eavesdropper", defense)
            row = scores.rows.setdefault(key, {"hits1": 0, "hits5": 0, "n": 0, "exact": 0, "sessions": 0, "longest": ""})
            chars = len(text)
            row["hits1"] += round(seen["coverage"] * chars)
            row["hits5"] += round(seen["coverage"] * chars)
            row["n"] += chars
            row["exact"] += int(seen["verbatim"])
            row["sessions"] += 1
            if len(seen["longest"]) > len(row["longest"]):
                row["longest"] = seen["longest"]
            runs = int_runs(list(ids))
            key = (split, direction, positions, "token-id-runs", "eavesdropper", defense)
            row = scores.rows.setdefault(key, {"hits1": 0, "hits5": 0, "n": 0, "exact": 0, "sessions": 0})
            found = round(attacks.visible_token_runs(stream, runs) * len(runs))
            row["hits1"] += found
            row["hits5"] += found
            row["n"] += max(len(runs), 1) if runs else 0
            row["exact"] += int(bool(runs) and found == len(runs))
            row["sessions"] += 1


class Progress:
    """Rich progress bars on stderr; plain timestamped lines when stderr is not a terminal (nohup logs)."""

    def __init__(self, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.enabled, self.began = enabled, time.perf_counter()
        self.lines = enabled and not self.console.is_terminal
        self.bar = Bar(TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=self.console, disable=not enabled or self.lines)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def task(self, description: str, total: int):
        task = self.bar.add_task(description, total=total)
        done = [0]

        def tick() -> None:
            self.bar.advance(task)
            done[0] += 1
            if self.lines:
                print(f"[{time.perf_counter() - self.began:7.1f} s] {description}: {done[0]}/{total}",
                      file=sys.stderr, flush=True)

        return tick


def resolve_defense(spec: str, calibration: torch.Tensor, seed: int | None = None):
    """A defense spec, with `clip=auto` and `nsr=R` (gaussian: noise norm / clip) calibrated on public text.

    `seed=None` draws a secret noise seed; the audit passes fixed seeds so its report is reproducible.
    """
    if spec in ("", "none"):
        return NoDefense()
    kind, _, rest = spec.partition(":")
    params = dict(item.split("=", 1) for item in rest.split(",") if item)
    if params.get("clip") == "auto":
        if kind == "gaussian":  # the median L2 norm of one position's state
            params["clip"] = f"{float(calibration.norm(dim=-1).median()):.4g}"
        else:  # the 99th percentile of one coordinate's magnitude
            sample = calibration.abs().flatten()[:2_000_000]
            params["clip"] = f"{float(sample.kthvalue(int(0.99 * len(sample))).values):.4g}"
    if "nsr" in params:  # sigma such that E|noise| = nsr * clip
        params["sigma"] = f"{float(params.pop('nsr')) * float(params['clip']) / math.sqrt(calibration.shape[-1]):.4g}"
    return parse_defense(f"{kind}:" + ",".join(f"{k}={v}" for k, v in params.items()), seed=seed)


@torch.inference_mode()
def split_perplexity(device: DeviceModel, body, ids: list[int], defense) -> float:
    """Perplexity of `ids` through head -> defense -> body -> tail, in process (one forward)."""
    head, tail = device.head.fork(), device.tail.fork()
    hidden = head.forward(torch.tensor([ids]), 0)
    hidden = body.fork().forward(defense.apply(hidden), 0)
    logits = tail.forward(hidden, 0, last_only=False)[0, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]))
    return math.exp(float(nll))


def audit_llm(config: LLMAuditConfig, *, progress: bool = True, log=print) -> dict:
    began = time.perf_counter()
    checkpoint = Checkpoint(config.model)
    n_layers = checkpoint.config.num_hidden_layers
    splits = sorted(set(config.splits))
    for x in splits:
        if not 1 <= x <= n_layers // 2:
            raise ValueError(f"split depth {x} needs 1 <= X <= N/2 = {n_layers // 2} (head X layers, tail X layers)")
    defense_x = config.defense_split or splits[0]
    scores = Scores()
    utility: list[dict] = []
    meta: dict = {"model": config.model, "layers": n_layers, "codec": config.codec, "prompts": len(config.prompts),
                  "max_new_tokens": config.max_new_tokens, "splits": [f"{x}:{n_layers - x}" for x in splits]}
    with Progress(progress) as bars:
        # -------- the attacker's preparation: public head, hidden states of public text
        public_head = load_head(checkpoint, max(splits + [defense_x]))
        vocab_size = public_head.embed.weight.shape[0]
        devices = {x: DeviceModel.load(checkpoint, f"{x}:{n_layers - x}") for x in splits}
        first = devices[splits[0]]
        sequences, vocab, unigram = inverters.build_sequences(
            first, inverters.shipped_text("kjv_train.txt"), max_tokens=config.train_tokens, seed=config.seed)
        tick = bars.task("hidden states of public text", len(sequences))
        features = inverters.head_features(public_head, sequences, sorted(set(splits + [defense_x])), progress=tick)
        meta["inverter_vocab"] = len(vocab)
        meta["training_positions"] = sum(len(s) for s in sequences)
        meta["training_text"] = "audit/data/kjv_train.txt (KJV Proverbs, Matthew 1-9; public domain)"
        tokens = torch.tensor([t for s in sequences for t in s])
        models: dict[int, dict] = {}
        tick = bars.task("train inverters (MLP, GRU)", 2 * len(splits))
        for x in splits:
            flat = torch.cat(features[x])
            mlp = inverters.train_mlp(flat, tokens, vocab, vocab_size, epochs=config.epochs, seed=config.seed)
            tick()
            gru = inverters.train_gru(features[x], sequences, vocab, vocab_size, epochs=GRU_EPOCH_FACTOR * config.epochs,
                                      seed=config.seed)
            tick()
            probe = attacks.fit_probe(flat, tokens, public_head.embed.weight)
            models[x] = {"mlp": mlp, "gru": gru, "probe": probe}

        # the tuned lens: layer Y -> last layer, fitted on a slice of the public text through all layers
        lens_sequences = sequences[: config.lens_sequences]
        depths = sorted({n_layers - x for x in splits + [defense_x]} | {n_layers})
        tick = bars.task("public text through all layers", len(lens_sequences))
        deep = inverters.head_features(load_head(checkpoint, n_layers), lens_sequences, depths, progress=tick)
        lenses = {x: attacks.fit_affine(torch.cat(deep[n_layers - x]), torch.cat(deep[n_layers]))
                  for x in set(splits + [defense_x])}
        for x in splits:
            models[x]["lens"] = lenses[x]
        del deep

        # -------- real sessions over a real loopback server
        services = [BodyService(str(checkpoint.folder), f"{x}:{n_layers - x}") for x in splits]
        if defense_x not in splits:
            services.append(BodyService(str(checkpoint.folder), f"{defense_x}:{n_layers - defense_x}"))
        if config.cloud_check:
            services.append(CloudService(str(checkpoint.folder)))
        server = BodyServer(services, port=0).start_in_thread()
        try:
            if config.cloud_check:
                tick = bars.task("cloud-only sessions", len(config.prompts))
                for prompt in config.prompts:
                    t = run_session(first, server.address, prompt, mode="cloud", max_new_tokens=config.max_new_tokens)
                    _eavesdrop(scores, "cloud", t, "none")
                    tick()
            undefended: dict[str, list[int]] = {}
            for x in splits:
                split = f"{x}:{n_layers - x}"
                attacker_tail = load_tail(checkpoint, n_layers - x)
                inversion = attacks.HeadInversion(load_head(checkpoint, x), vocab_size,
                                                  sweep_budget_s=config.sweep_budget_s)
                tick = bars.task(f"split {split}: sessions + attacks", len(config.prompts))
                for prompt in config.prompts:
                    t = run_session(devices[x], server.address, prompt, mode="split",
                                    max_new_tokens=config.max_new_tokens, codec=config.codec)
                    if x == defense_x:
                        undefended[prompt] = t.token_ids
                    _attack_session(scores, split, t, "none", inversion, attacker_tail, models[x], vocab, unigram,
                                    proposals=config.proposals)
                    tick()
                meta.setdefault("exact_inversion", {})[split] = {
                    "full_vocabulary_sweeps": inversion.sweeps, "sweep_seconds": round(inversion.sweep_seconds, 1)}

            # -------- defenses: privacy and utility at one split
            meta["proposals_per_ranker"] = config.proposals
            if config.defenses:
                meta["defenses"] = {
                    "noise_seed": f"fixed ({config.seed}) so this report is reproducible; generate --defense draws "
                                  "a secret seed",
                    "exact_inversion_sweep_budget_s": 0,
                    "note": "under a defense the exact inversion tries only the rankers' candidates, never the "
                            "whole vocabulary: its defended figures are lower bounds for that attacker"}
                utility = _audit_defenses(config, checkpoint, server, defense_x, features, sequences, tokens, vocab,
                                          unigram, vocab_size, scores, undefended, bars, lenses[defense_x])
        finally:
            server.stop()
    meta["seconds"] = round(time.perf_counter() - began, 1)
    meta["machine"] = _machine()
    return {"meta": meta, "results": scores.results(KEYS), "utility": utility}


def _attack_session(scores: Scores, split: str, t: Transcript, defense_name: str, inversion, tail, models: dict,
                    vocab: torch.Tensor, unigram: torch.Tensor, *, proposals: int,
                    defense_row: dict | None = None) -> None:
    _eavesdrop(scores, split, t, defense_name)
    up, down = t.hidden("up"), t.hidden("down")
    targets = _targets(t)
    extra = defense_row or {}
    # public weights: exact inversion, candidates from the linear probe (nearest public embeddings)
    # and the MLP's top-k
    k = min(proposals, inversion.vocab_size)
    ranked = torch.cat([attacks.nearest_embeddings(inversion.head.embed.weight, up, k, models["probe"]),
                        inverters.predict(models["mlp"], up, vocab, k)], dim=1)
    found = inversion.invert(up, ranked)
    predictions = {
        ("uplink", "exact-inversion", "public-weights"): found["top5"],
        ("uplink", "mlp-inverter", "auxiliary-data"): inverters.predict(models["mlp"], up, vocab),
        ("uplink", "gru-inverter", "auxiliary-data"): inverters.predict(models["gru"], up, vocab),
        # the probe ranks the public embedding table: it needs the public weights
        ("uplink", "linear-probe", "public-weights"): ranked[:, :5],
        ("uplink", "unigram-baseline", "baseline"): unigram[:5].expand(len(up), -1),
        ("downlink", "logit-lens", "public-weights"): attacks.logit_lens(tail, down).topk(5, dim=-1).indices,
        ("downlink", "tuned-lens", "public-weights"): attacks.tuned_lens(tail, down, models["lens"]).topk(5, dim=-1).indices,
        ("downlink", "public-tail", "public-weights"): attacks.public_tail(tail, down).topk(5, dim=-1).indices,
        ("downlink", "unigram-baseline", "baseline"): unigram[:5].expand(len(down), -1),
    }
    # The learned inverters can only name tokens in their output vocabulary: their ceiling.
    in_vocab = torch.isin(torch.tensor(t.sequence), vocab)
    for positions in ("prompt", "generated"):
        index, truth = targets[("uplink", positions)]
        ceiling = torch.where(in_vocab[index], truth, torch.full_like(truth, -1))[:, None].expand(-1, 5)
        scores.add((split, "uplink", positions, "inverter-vocabulary-ceiling", "auxiliary-data", defense_name),
                   ceiling, truth, extra)
    for (direction, attack, threat), top5 in predictions.items():
        for positions in ("prompt", "generated"):
            index, truth = targets[(direction, positions)]
            scores.add((split, direction, positions, attack, threat, defense_name), top5[index], truth, extra)
    index, _ = targets[("uplink", "prompt")]
    key = (split, "uplink", "prompt", "exact-inversion", "public-weights", defense_name)
    row = scores.rows[key]
    row["verified"] = row.get("verified", 0) + int(found["verified"][index].sum())


def _audit_defenses(config, checkpoint, server, x, features, sequences, tokens, vocab, unigram, vocab_size,
                    scores, undefended, bars, lens) -> list[dict]:
    n_layers = checkpoint.config.num_hidden_layers
    split = f"{x}:{n_layers - x}"
    device = DeviceModel.load(checkpoint, split)
    body = load_body(checkpoint, x, n_layers - x)
    tail = load_tail(checkpoint, n_layers - x)
    heldout = device.tokenizer(inverters.shipped_text("kjv_heldout.txt"), add_special_tokens=False)["input_ids"]
    heldout = heldout[: config.perplexity_tokens]
    calibration = torch.cat(features[x])
    flat = calibration
    prompts = config.prompts[: config.defense_prompts]
    base_ppl = split_perplexity(device, body, heldout, NoDefense())
    rows = [{"defense": "none", "split": split, "greedy_agreement": 1.0, "perplexity": base_ppl,
             "perplexity_change": 0.0, "accounting": NoDefense().accounting()}]
    tick = bars.task(f"defenses at {split}", len(config.defenses) * (len(prompts) + 1))
    for spec in config.defenses:
        defense = resolve_defense(spec, calibration, seed=config.seed)  # fixed: a reproducible report
        if isinstance(defense, NoDefense):
            tick()
            continue
        # The attacker knows the mechanism, not the noise: trains on its own defended states (seeds other than
        # the session's), searches with clipped candidates.
        mlp = inverters.train_mlp(flat, tokens, vocab, vocab_size, epochs=max(2, config.epochs // 2), seed=config.seed,
                                  transform=resolve_defense(spec, calibration, seed=config.seed + 1).apply)
        gru = inverters.train_gru([resolve_defense(spec, calibration, seed=config.seed + 2).apply(f) for f in features[x]],
                                  sequences, vocab, vocab_size, epochs=max(2, GRU_EPOCH_FACTOR * config.epochs // 2),
                                  seed=config.seed)
        probe = attacks.fit_probe(resolve_defense(spec, calibration, seed=config.seed + 3).apply(flat), tokens,
                                  device.head.embed.weight)
        # No full-vocabulary sweeps under a defense (budget 0): only the rankers' candidates are tried.
        inversion = attacks.HeadInversion(load_head(checkpoint, x), vocab_size, public=defense.public, sweep_budget_s=0)
        agree, total = 0, 0
        positions = 0
        for prompt in prompts:
            t = run_session(device, server.address, prompt, mode="split", max_new_tokens=config.max_new_tokens,
                            codec=config.codec, defense=defense)
            if prompt not in undefended:
                undefended[prompt] = run_session(device, server.address, prompt, mode="split", codec=config.codec,
                                                 max_new_tokens=config.max_new_tokens).token_ids
            reference = undefended[prompt]
            agree += sum(a == b for a, b in zip(reference, t.token_ids))
            total += len(reference)
            positions += len(t.prompt_ids) + len(t.token_ids) - 1
            _attack_session(scores, split, t, defense.name, inversion, tail,
                            {"mlp": mlp, "gru": gru, "probe": probe, "lens": lens},
                            vocab, unigram, proposals=config.proposals)
            tick()
        ppl = split_perplexity(device, body, heldout, defense)
        rows.append({"defense": defense.name, "spec": spec, "split": split, "greedy_agreement": agree / max(total, 1),
                     "perplexity": ppl, "perplexity_change": ppl / base_ppl - 1,
                     "accounting": defense.accounting(positions=round(positions / len(prompts)))})
        tick()
    return rows


def _machine() -> str:
    import os
    import platform

    return f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU, torch {torch.__version__}, {torch.get_num_threads()} threads"
