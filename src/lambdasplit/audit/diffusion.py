"""`lambdasplit audit diffusion`: what a captured split text-to-image session gives away.

Sessions run over a real UNetService on loopback (diffusion/server.py) with the transport's
capture on. From the bytes alone (frames parsed as the receiver parses them):

    replay        the attacker with the public pipeline (no U-Net needed) rebuilds the
                  latent trajectory: cloud-latent sends the initial latent and every noise;
                  client-latent sends x_t and gets the noise back, so one scheduler step
                  gives the next latent. Decoded by the public VAE -> the user's image.
    complete      with `--local-steps K` the last K steps run on the device; the cloud
                  (which has the U-Net) and anyone with the public weights can run them
                  itself from the captured conditioning: measured, not assumed.
    preview       x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) at every captured
                  step, decoded: how early the image shows (PSNR vs the user's image).
    prompt        the text embeddings cross the wire: candidate matching through the public
                  text encoder, exact position-by-position search for a causal encoder
                  (CLIP), and a learned per-position inverter trained on public text.
                  Candidates (`candidate_set` in the report): for zoo:digits its whole public
                  prompt set (digits_data.all_prompts(), 60 prompts); else a user-given list
                  (`--candidates FILE`), or by default the audited prompts themselves, a
                  closed-world best case for the attacker.

Assumptions (stated in the report): a deterministic scheduler whose `step` uses no fresh
noise (DDIM, eta 0, as both protocols require), and, for client-latent, the public
pipeline's own scheduler config; the timesteps are in the captured HELLO.
"""

from __future__ import annotations

import json
import math
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lambdasplit.audit.attacks import visible_text
from lambdasplit.audit.capture import split_frames
from lambdasplit.wire.frames import FrameType


@dataclass
class DiffusionAuditConfig:
    model: str
    protocol: str = "both"  # cloud-latent, client-latent or both
    steps: int | None = None  # default: the model's (zoo:digits 25)
    sessions: int = 10
    local_steps: list[int] = field(default_factory=lambda: [0, 2, 5, 10])
    codec: str = "fp16"
    seed: int = 42
    prompts: list[str] | None = None  # default: zoo:digits prompts, or generic ones
    candidates: list[str] | None = None  # prompt-matching candidates; default: see candidate_set()
    train_tokens: int = 6000
    epochs: int = 8


@dataclass
class Captured:
    """One diffusion session as seen on the link."""

    hello: dict
    up: list[tuple[int, list[torch.Tensor]]]  # (step, tensors) per STEP
    down: list[tuple[int, list[torch.Tensor]]]  # (step, tensors) per RESULT
    up_bytes: bytes
    down_bytes: bytes


def parse_capture(chunks: list[tuple[str, bytes]]) -> Captured:
    from lambdasplit.diffusion.protocols import parse_blobs

    up = b"".join(d for k, d in chunks if k == "up")
    down = b"".join(d for k, d in chunks if k == "down")
    hello, steps, results = {}, [], []
    for frame_type, body in split_frames(up):
        if frame_type == FrameType.HELLO:
            hello = json.loads(bytes(body))
        elif frame_type == FrameType.STEP:
            steps.append((struct.unpack_from("<I", body, 0)[0], [t for t, _, _ in parse_blobs(body, 4)]))
    for frame_type, body in split_frames(down):
        if frame_type == FrameType.RESULT:
            results.append((struct.unpack_from("<I", body, 0)[0], [t for t, _, _ in parse_blobs(body, 8)]))
    return Captured(hello, steps, results, up, down)


class Replayer:
    """The attacker's copy of the public pipeline: scheduler, VAE decoder, text encoder, U-Net."""

    def __init__(self, device):
        self.device = device
        self.pipe = device.pipe

    def scheduler(self, hello: dict):
        import diffusers

        spec = hello.get("scheduler")
        if spec:  # cloud-latent sends the scheduler it uses
            return getattr(diffusers, spec["class"]).from_config(spec["config"])
        return type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)

    def timesteps(self, scheduler, hello: dict) -> torch.Tensor:
        if "timesteps" in hello:
            dtype = torch.float32 if hello.get("timestep_dtype") == "float32" else torch.int64
            steps = torch.tensor(hello["timesteps"], dtype=dtype)
            scheduler.set_timesteps(len(steps))
            if not torch.equal(scheduler.timesteps.to(dtype), steps):
                scheduler.set_timesteps(timesteps=steps.tolist())
            return steps
        scheduler.set_timesteps(int(hello["steps"]))
        return scheduler.timesteps

    def conditioning(self, cap: Captured):
        from lambdasplit.diffusion.split import Conditioning

        tensors = cap.up[0][1]
        if cap.hello.get("diffusion") == "cloud-latent":
            return Conditioning.from_tensors(tensors[:-1])
        return Conditioning.from_tensors(tensors[1:])

    @torch.no_grad()
    def replay(self, cap: Captured, *, complete: bool) -> tuple[np.ndarray | None, list[np.ndarray], list[int]]:
        """(final image or None, decoded previews per captured step, the step indices)."""
        from lambdasplit.diffusion.split import predict_noise

        scheduler = self.scheduler(cap.hello)
        timesteps = self.timesteps(scheduler, cap.hello)
        noises = {step: tensors[0] for step, tensors in cap.down}
        cloud_latent = cap.hello.get("diffusion") == "cloud-latent"
        latents = cap.up[0][1][-1] if cloud_latent else None
        inputs = {step: tensors[0] for step, tensors in cap.up}
        previews, indices = [], []
        last = max(noises) if noises else -1
        for i in range(last + 1):
            t = timesteps[i]
            scale = scheduler.scale_model_input(torch.ones(1), t)
            if not cloud_latent:
                latents = inputs[i] / scale  # client-latent: x_t itself is on the wire
            model_input = latents * scale
            abar = scheduler.alphas_cumprod[int(t)]
            x0 = (model_input - (1 - abar).sqrt() * noises[i]) / abar.sqrt()
            previews.append(self.device.decode(x0))
            indices.append(i)
            latents = scheduler.step(noises[i], t, latents, eta=0.0, return_dict=False)[0] if _takes_eta(scheduler) \
                else scheduler.step(noises[i], t, latents, return_dict=False)[0]
        if last + 1 < len(timesteps):
            if not complete or self.pipe.unet is None:
                return None, previews, indices
            cond = self.conditioning(cap)
            guidance = float(cap.hello.get("guidance", 1.0))
            for t in timesteps[last + 1:]:
                noise = predict_noise(self.pipe.unet, scheduler.scale_model_input(latents, t), t, cond, guidance)
                latents = scheduler.step(noise, t, latents, eta=0.0, return_dict=False)[0] if _takes_eta(scheduler) \
                    else scheduler.step(noise, t, latents, return_dict=False)[0]
        return self.device.decode(latents), previews, indices


def _takes_eta(scheduler) -> bool:
    import inspect

    return "eta" in inspect.signature(scheduler.step).parameters


# ---------------------------------------------------------------- prompt recovery


class PromptRecovery:
    """Text embeddings on the wire -> the prompt, through the public text encoder."""

    def __init__(self, device):
        self.pipe = device.pipe
        self.device = device
        self.tokenizer, self.encoder = self.pipe.tokenizer, self.pipe.text_encoder
        self.causal = getattr(self.encoder.config, "model_type", "") in ("clip_text_model", "clip")
        self.length = self.tokenizer.model_max_length
        self.special = set(self.tokenizer.all_special_ids)

    def ids(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, padding="max_length", max_length=self.length, truncation=True).input_ids

    @torch.no_grad()
    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, L] -> [B, L, D], as the pipeline's encode_prompt computes the positive half."""
        mask = torch.ones_like(ids) if not self.causal else None
        if not self.causal:  # BERT-style: encode_prompt passes the tokenizer's attention mask
            mask = (ids != self.tokenizer.pad_token_id).long()
            use_mask = getattr(self.encoder.config, "use_attention_mask", False)
            mask = mask if use_mask else None
        return self.encoder(ids, attention_mask=mask)[0].float()

    @torch.no_grad()
    def causal_search(self, embeds: torch.Tensor) -> torch.Tensor:
        """Position by position over the whole vocabulary: [L, 5] best candidates."""
        vocab = torch.arange(len(self.tokenizer))
        prefix: list[int] = []
        out = []
        for p in range(embeds.shape[0]):
            batch = torch.cat([torch.tensor(prefix, dtype=torch.long).expand(len(vocab), p), vocab[:, None]], dim=1)
            dists = torch.cat([(self.embed_ids(batch[i:i + 1024])[:, p] - embeds[p]).norm(dim=-1)
                               for i in range(0, len(vocab), 1024)])
            best = dists.argsort()[:5]
            out.append(vocab[best])
            prefix.append(int(vocab[best[0]]))
        return torch.stack(out)

    @torch.no_grad()
    def match(self, embeds: torch.Tensor, candidates: list[str], guidance: float, size) -> tuple[str, float]:
        """Nearest candidate prompt (through the pipeline's own encode_prompt) and its distance."""
        best, best_d = "", math.inf
        for text in candidates:
            cond = self.device.encode(text, None, guidance, size)
            d = float((cond.prompt_embeds[-1].float() - embeds).norm())
            if d < best_d:
                best, best_d = text, d
        return best, best_d

    def training_set(self, text: str, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of public-text windows (the attacker's auxiliary data) and their token ids."""
        words = self.tokenizer(text, add_special_tokens=False).input_ids[:max_tokens]
        window = max(1, self.length - 2)
        rows = [self.tokenizer.decode(words[i:i + window]) for i in range(0, len(words) - window, window)]
        ids = torch.tensor([self.ids(r) for r in rows])
        feats = torch.cat([self.embed_ids(ids[i:i + 64]) for i in range(0, len(ids), 64)])
        return feats.reshape(-1, feats.shape[-1]), ids.reshape(-1)


# ---------------------------------------------------------------- the audit


def _default_prompts(model: str, n: int) -> tuple[list[str], list[int | None]]:
    from lambdasplit.zoo import digits_data

    return [digits_data.prompt(i % 10, i // 10 + i % 3) for i in range(n)], [i % 10 for i in range(n)]


def candidate_set(config: DiffusionAuditConfig, prompts: list[str]) -> tuple[list[str], str]:
    """The candidates the matching attack compares against, and a plain description of them."""
    if config.candidates:
        return list(config.candidates), f"user-given list of {len(config.candidates)} prompts"
    if config.model == "zoo:digits":
        from lambdasplit.zoo import digits_data

        every = digits_data.all_prompts()[0]
        return every, f"the whole public prompt set of zoo:digits (digits_data.all_prompts(), {len(every)} prompts)"
    return list(prompts), ("the audited prompts themselves (no public prompt set for this model; pass --candidates "
                           "FILE): a closed-world best case for the attacker")


def audit_diffusion(config: DiffusionAuditConfig, *, progress: bool = True) -> dict:
    from lambdasplit.audit import inverters
    from lambdasplit.audit.llm import Progress
    from lambdasplit.diffusion.client import default_settings, imagine
    from lambdasplit.diffusion.quality import psnr
    from lambdasplit.diffusion.server import UNetService
    from lambdasplit.diffusion.split import Device
    from lambdasplit.server import BodyServer

    began = time.perf_counter()
    protocols = ["cloud-latent", "client-latent"] if config.protocol == "both" else [config.protocol]
    default_steps, guidance = default_settings()
    steps = config.steps or default_steps
    prompts, digits = (config.prompts, [None] * len(config.prompts)) if config.prompts else \
        _default_prompts(config.model, config.sessions)
    device = Device.load(config.model, with_unet=True)  # the user's device (runs local steps)
    attacker = Replayer(Device.load(config.model, with_unet=True))  # public weights, the attacker's own copy
    recovery = PromptRecovery(attacker.device)
    judge = _judge(config.model)
    candidates, candidate_note = candidate_set(config, prompts)
    size = (device.info.default_size(),) * 2
    rows, curves, utility = [], {}, []
    with Progress(progress) as bars:
        # the learned inverter on text embeddings: public text, disjoint from the prompts
        feats, ids = recovery.training_set(inverters.shipped_text("kjv_train.txt"), config.train_tokens)
        vocab = torch.unique(ids)
        mlp = inverters.train_mlp(feats, ids, vocab, len(recovery.tokenizer), epochs=config.epochs, seed=config.seed)
        server = BodyServer([UNetService(str(device.info.folder))], port=0).start_in_thread()
        try:
            for protocol in protocols:
                reference: dict[int, np.ndarray] = {}
                for k in sorted(config.local_steps):
                    if k > steps:
                        continue
                    tick = bars.task(f"{protocol}, last {k} steps local", len(prompts))
                    acc = _Acc()
                    for i, prompt in enumerate(prompts):
                        chunks: list = []
                        t0 = time.perf_counter()
                        result = imagine(device, prompt, mode="split", server=server.address, protocol=protocol,
                                         steps=steps, seed=config.seed + i, guidance=guidance, codec=config.codec,
                                         local_steps=k, capture=chunks)
                        seconds = time.perf_counter() - t0
                        user = result.image
                        reference.setdefault(i, user)
                        cap = parse_capture(chunks)
                        _score_session(acc, cap, user, prompt, digits[i], attacker, recovery, mlp, vocab, judge, size,
                                       guidance, candidates, k, curves, protocol)
                        acc.add("utility", psnr=_finite(psnr(reference[i], user)), seconds=seconds,
                                local_seconds=result.record.get("local_seconds", 0.0),
                                prompt_match=_digit_ok(judge, user, digits[i]))
                        tick()
                    for (attack, threat), values in acc.rows.items():
                        if attack == "utility":
                            utility.append({"protocol": protocol, "local_steps": k, **_mean(values)})
                        else:
                            rows.append({"protocol": protocol, "local_steps": k, "attack": attack,
                                         "threat_model": threat, **_mean(values)})
        finally:
            server.stop()
    meta = {"model": config.model, "steps": steps, "guidance": guidance, "codec": config.codec,
            "sessions": len(prompts), "text_encoder": type(recovery.encoder).__name__,
            "causal_text_encoder": recovery.causal, "inverter_vocab": len(vocab),
            "candidate_set": candidate_note, "candidates": len(candidates),
            "audited_prompts_in_candidates": sum(p in candidates for p in prompts),
            "assumptions": "deterministic scheduler step (DDIM, eta 0); client-latent: the public pipeline's scheduler "
                           "config with the timesteps from the captured HELLO",
            "seconds": round(time.perf_counter() - began, 1)}
    from lambdasplit.audit.llm import _machine

    meta["machine"] = _machine()
    return {"meta": meta, "results": rows, "utility": utility,
            "preview_curve": {key: [float(np.mean(v)) for v in value] for key, value in curves.items()}}


class _Acc:
    def __init__(self):
        self.rows: dict[tuple[str, str], list[dict]] = {}

    def add(self, attack: str, threat: str = "", **values) -> None:
        self.rows.setdefault((attack, threat), []).append(values)


def _mean(values: list[dict]) -> dict:
    keys = {k for v in values for k in v}
    out = {}
    for k in sorted(keys):
        got = [v[k] for v in values if v.get(k) is not None]
        out[k] = float(np.mean(got)) if got else None
    out["sessions"] = len(values)
    return out


def _finite(x: float) -> float:
    return 100.0 if math.isinf(x) else x  # identical images: PSNR capped at 100 dB in averages


def _judge(model: str):
    if model != "zoo:digits":
        return None
    from lambdasplit.zoo.digit_classifier import classifier

    return classifier()


def _digit_ok(judge, image, digit) -> float | None:
    if judge is None or digit is None:
        return None
    return float(judge.predict(image[None])[0] == digit)


def _score_session(acc, cap, user, prompt, digit, attacker, recovery, mlp, vocab, judge, size, guidance, candidates,
                   k, curves, protocol) -> None:
    from lambdasplit.audit import inverters
    from lambdasplit.diffusion.quality import psnr, ssim, to_uint8

    # eavesdropper without the model: the prompt text in the bytes?
    for direction, stream in (("uplink", cap.up_bytes), ("downlink", cap.down_bytes)):
        seen = visible_text(stream, prompt)
        acc.add(f"utf8-substrings ({direction})", "eavesdropper", coverage=seen["coverage"], exact=float(seen["verbatim"]))
    # replay without the U-Net, then completed with it
    for attack, threat, complete in (("replay", "public-weights (no U-Net)", False),
                                     ("replay + U-Net completion", "public-weights / curious cloud", True)):
        image, previews, _ = attacker.replay(cap, complete=complete)
        if image is None:
            final = previews[-1] if previews else None  # the best the attacker has: the last preview
            acc.add(attack, threat, exact=0.0, psnr=_finite(psnr(user, final)) if final is not None else None,
                    ssim=ssim(user, final) if final is not None else None, digit=_digit_ok(judge, final, digit))
        else:
            acc.add(attack, threat, exact=float(np.array_equal(to_uint8(user), to_uint8(image))),
                    psnr=_finite(psnr(user, image)), ssim=ssim(user, image), digit=_digit_ok(judge, image, digit))
        if not complete and k == 0:
            curves.setdefault(f"{protocol} psnr", [[] for _ in previews])
            for i, preview in enumerate(previews):
                curves[f"{protocol} psnr"][i].append(_finite(psnr(user, preview)))
            if judge is not None:
                curves.setdefault(f"{protocol} digit", [[] for _ in previews])
                for i, preview in enumerate(previews):
                    curves[f"{protocol} digit"][i].append(_digit_ok(judge, preview, digit))
    # the prompt, from the text embeddings (positive half, the last row under guidance)
    cond = attacker.conditioning(cap)
    embeds = cond.prompt_embeds[-1].float()
    truth = torch.tensor(recovery.ids(prompt))
    scored = torch.tensor([t not in recovery.special for t in truth.tolist()])
    best, distance = recovery.match(embeds, candidates, guidance, size)
    acc.add("candidate matching", "public-weights", exact=float(best == prompt), distance=distance)
    top5 = inverters.predict(mlp, embeds, vocab)
    _tokens(acc, "learned inverter (MLP)", "auxiliary-data", top5, truth, scored)
    if recovery.causal:
        _tokens(acc, "exact causal search", "public-weights", recovery.causal_search(embeds), truth, scored)


def _tokens(acc, attack, threat, top5, truth, scored) -> None:
    hit1 = (top5[:, 0] == truth)[scored]
    hit5 = (top5 == truth[:, None]).any(dim=1)[scored]
    acc.add(attack, threat, top1=float(hit1.float().mean()), top5=float(hit5.float().mean()),
            exact=float(bool(hit1.all())))


# ---------------------------------------------------------------- reports


def write_diffusion(report: dict, out: Path, command: str) -> list[Path]:
    from lambdasplit.audit.report import _markdown_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps({"command": command, **report}, indent=1, default=str))
    charts = [preview_chart(report, out / "preview.png")]
    meta = report["meta"]
    header, lines = diffusion_table(report)
    uh, ul = utility_table(report)
    text = [f"# Diffusion privacy audit: {meta['model']}", "", f"Command: `{command}`", "",
            f"Machine: {meta['machine']}; wall time {meta['seconds']} s. {meta['sessions']} sessions per setting, "
            f"{meta['steps']} steps, guidance {meta['guidance']}, codec {meta['codec']}, TLS off.", "",
            f"Assumptions: {meta['assumptions']}.", "",
            f"Prompt matching candidates: {meta.get('candidate_set')}; {meta.get('audited_prompts_in_candidates')} of "
            f"the {meta['sessions']} audited prompts are among them.", "", "## Attacks", "", _markdown_table(header, lines), "",
            "## Defense: the last K steps on the device (utility)", "", _markdown_table(uh, ul), ""]
    text += [f"![{p.stem}]({p.name})" for p in charts if p]
    (out / "report.md").write_text("\n".join(text) + "\n")
    return [out / "report.json", out / "report.md", *[p for p in charts if p]]


def _fmt(value, pct=False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:.1f}%" if pct else f"{value:.2f}"


def diffusion_table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["protocol", "local steps", "attack", "threat model", "exact", "PSNR dB", "SSIM", "digit", "top-1", "top-5"]
    lines = [[r["protocol"], str(r["local_steps"]), r["attack"], r["threat_model"], _fmt(r.get("exact"), True),
              _fmt(r.get("psnr")), _fmt(r.get("ssim")), _fmt(r.get("digit"), True), _fmt(r.get("top1"), True),
              _fmt(r.get("top5"), True)] for r in report["results"]]
    return header, lines


def utility_table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["protocol", "local steps", "PSNR vs all-cloud image (dB, 100 = identical)", "prompt match", "seconds"]
    lines = [[u["protocol"], str(u["local_steps"]), _fmt(u.get("psnr")), _fmt(u.get("prompt_match"), True),
              _fmt(u.get("seconds"))] for u in report["utility"]]
    return header, lines


def preview_chart(report: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report.get("preview_curve") or {}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, values in curves.items():
        if key.endswith("psnr"):
            ax.plot(range(1, len(values) + 1), values, marker=".", label=key.replace(" psnr", ""))
    ax.set_xlabel("denoising step the eavesdropper has seen")
    ax.set_ylabel("PSNR of decoded x0 preview vs the user's image (dB)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax2 = ax.twinx()
    for key, values in curves.items():
        if key.endswith("digit"):
            ax2.plot(range(1, len(values) + 1), values, linestyle="--", label=key)
            ax2.set_ylabel("preview classified as the prompted digit (dashed)")
    fig.suptitle(f"{report['meta']['model']}: the image before it is finished", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_diffusion(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=True, width=160)
    for title, (header, lines) in (("diffusion attacks", diffusion_table(report)),
                                   ("last K steps on the device: utility", utility_table(report))):
        table = Table(title=title)
        for name in header:
            table.add_column(name)
        for line in lines:
            table.add_row(*line)
        console.print(table)
