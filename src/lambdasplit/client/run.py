"""One generation in any mode, with its measurements: what `generate --json` prints.

    local  the whole model in this process; nothing crosses a network
    split  head + tail here, body on a server: hidden states cross the wire
    cloud  the prompt text goes to the server, which runs the whole model
    shared every linear layer on additive secret shares over two servers (`server="A,B"`,
           lambdasplit.shares.run.run_shared)

Time is split as the Λ-Split paper splits it, but measured: local (head + tail +
sampling), cloud (body compute, timed by the server and reported in each RESULT),
communication (the rest of the wall time).
"""

from __future__ import annotations

from lambdasplit.client.device import DeviceModel
from lambdasplit.client.generation import Sampling
from lambdasplit.client.remote import CloudClient, FailoverBody, VerifiedBody, parse_servers
from lambdasplit.errors import LambdaSplitError
from lambdasplit.llm.checkpoint import Checkpoint


def run_generation(*, model: str | Checkpoint, mode: str, prompt: str, max_new_tokens: int,
                   split: str | None = None, server: str | None = None, cache: str = "kv", codec: str = "fp32",
                   sampling: Sampling | None = None, dtype: str = "float32", token: str | None = None,
                   tls_ca: str | None = None, link=None, ignore_eos: bool = False, chat: bool | None = None,
                   device: DeviceModel | None = None, on_text=None, capture: list | None = None,
                   defense=None, timeout: float | None = None, insecure: bool = False, speculate: str = "none",
                   draft_model: str | None = None, draft_tokens: int | str = "auto", verify: bool = False,
                   max_failovers: int | None = None, trace_rounds: bool = False,
                   refine_gap: float | str = "auto", prefill_codec: str | None = "auto") -> dict:
    """Generate once and return the `generate --json` record. Pass `device` to reuse loaded weights.

    `speculate` names a draft source (lambdasplit.speculative: none, lookup, lookahead, draft,
    eagle); the record then adds `speculate`, `accepted_per_round_trip` and the drafted /
    rejected position counts (rejected positions crossed the wire too: their bytes are counted).

    `server` may list several body servers, "A,B,...": split mode fails over to the next
    (client/remote.py FailoverBody; the record adds `failovers` and `servers`, which served);
    with `verify`, every step goes to the first two and their answers must agree (VerifiedBody).
    `trace_rounds` adds `rounds`: per speculative round, the draft length chosen, why, and the costs
    `--draft-tokens auto` fitted (speculative/adaptive.py).
    `refine_gap`: the near-tie guard of a lossy codec (client/generation.py StepModel; "auto":
    `default_refine_gap(codec)`); the record adds `refine_gap` and `refined` (steps refined).
    `prefill_codec`: a calK session's prompt step at a finer bound (client/remote.py prefill_bound).
    """
    sampling = sampling or Sampling()
    if speculate not in (None, "none") and mode == "cloud":
        raise LambdaSplitError("--speculate runs on the device (local or split mode), not in cloud mode")
    options = dict(token=token, tls_ca=tls_ca, link=link, capture=capture, timeout=timeout, insecure=insecure)
    if verify and mode != "split":
        raise LambdaSplitError("--verify compares the body's answers of two servers: it needs --mode split")
    if mode == "cloud":
        if not server:
            raise LambdaSplitError("cloud mode needs --server HOST:PORT")
        if len(parse_servers(server)) > 1:
            raise LambdaSplitError("cloud mode takes one --server (failover over a server list is split mode's)")
        checkpoint = model if isinstance(model, Checkpoint) else Checkpoint(model)
        with CloudClient(server, fingerprint=checkpoint.fingerprint, dtype=dtype, **options) as client:
            done = client.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling, cache=cache,
                                   ignore_eos=ignore_eos, chat=chat, on_text=on_text)
            client.close()
            record = _record(mode, None, cache, None, done["text"], done["token_ids"], done["prompt_tokens"],
                             done["seconds"], 0.0, client.cloud_seconds, client)
        return record
    if mode == "local":
        device = device or DeviceModel.load(model, None, dtype)
        source = _source(speculate, device, draft_model, sampling)
        result = device.generate(prompt, max_new_tokens=max_new_tokens, sampling=sampling, cache=cache,
                                 ignore_eos=ignore_eos, chat=chat, on_text=on_text, speculate=source,
                                 draft_tokens=draft_tokens)
        record = _record(mode, None, cache, None, result.text, result.token_ids, len(result.prompt_ids),
                         result.seconds, result.local_seconds, 0.0, None)
        return _add_speculation(record, result, speculate, draft_tokens, trace_rounds)
    if mode == "shared":  # every linear layer on secret shares over two servers; `server` is "A,B"
        from lambdasplit.shares.run import run_shared

        return run_shared(model=model, prompt=prompt, servers=server, max_new_tokens=max_new_tokens,
                          sampling=sampling, token=token, tls_ca=tls_ca, link=link, ignore_eos=ignore_eos, chat=chat,
                          on_text=on_text, timeout=timeout, insecure=insecure, speculate=speculate,
                          draft_model=draft_model, draft_tokens=draft_tokens, cache=cache)
    if mode != "split":
        raise LambdaSplitError(f"mode must be split, local, cloud or shared, not {mode!r}")
    if not server or not split:
        raise LambdaSplitError("split mode needs --split X:Y and --server HOST:PORT")
    if defense is not None and getattr(defense, "name", None) != "none" and cache != "kv":
        # Without the KV cache every step re-sends every position with fresh noise: averaging the
        # copies removes the noise, while the defense's accounting counts each position once.
        raise LambdaSplitError("--defense needs --cache kv: with --cache none every position is re-sent with fresh "
                               "noise at every step, and averaging those copies removes the noise")
    device = device or DeviceModel.load(model, split, dtype)
    source = _source(speculate, device, draft_model, sampling)
    options["prefill_codec"] = prefill_codec
    if verify:
        body = VerifiedBody.for_device(device, server, codec=codec, defense=defense, **options)
    else:
        body = FailoverBody.for_device(device, server, codec=codec, defense=defense, max_failovers=max_failovers,
                                       **options)
    # the guard refines plain steps only (StepModel): "auto" leaves it off when speculating
    speculating = speculate not in (None, "none")
    gap = (0.0 if speculating else default_refine_gap(codec)) if refine_gap == "auto" else float(refine_gap)
    with body:
        result = device.generate(prompt, body=body, max_new_tokens=max_new_tokens, sampling=sampling, cache=cache,
                                 ignore_eos=ignore_eos, chat=chat, on_text=on_text, speculate=source,
                                 draft_tokens=draft_tokens, refine_gap=gap)
        body.close()
        record = _record(mode, f"{device.split[0]}:{device.split[1]}", cache, body.codec.name, result.text,
                         result.token_ids, len(result.prompt_ids), result.seconds, result.local_seconds,
                         body.cloud_seconds, body)
        record["payload_bytes"] = body.stats.payload_bytes
        record["scale_bytes"] = body.stats.scale_bytes
        record["failovers"], record["servers"] = body.failovers, body.servers
        record["refine_gap"], record["refined"] = gap if body.can_refine else 0.0, result.refined
        if verify:
            record["verified_by"] = body.addresses
            record["verify_max_difference"] = body.max_difference
            record["verify_tolerance"] = body.tolerance
    return _add_speculation(record, result, speculate, draft_tokens, trace_rounds)


DEFAULT_REFINE_GAP = 0.02  # logits; flags ~0.7% of SmolLM2's positions (docs/benchmarks.md)


def default_refine_gap(codec: str) -> float:
    """The near-tie guard's gap for a codec: none for the float codecs (nothing to refine), else DEFAULT_REFINE_GAP."""
    from lambdasplit.client.remote import PRECISE_CODECS
    from lambdasplit.wire.codecs import get_codec

    return 0.0 if get_codec(codec, default_granularity="token").name in PRECISE_CODECS else DEFAULT_REFINE_GAP


def _source(speculate, device, draft_model, sampling):
    from lambdasplit.speculative import make_source

    return make_source(speculate, device, draft_model=draft_model, sampling=sampling)


def _add_speculation(record: dict, result, speculate, draft_tokens, trace_rounds: bool = False) -> dict:
    """accepted_per_round_trip: tokens committed by the steps after the prompt's, per such step."""
    record.update({
        "speculate": speculate or "none", "draft_tokens": draft_tokens if speculate not in (None, "none") else 0,
        "steps": result.steps, "accepted_per_round_trip": result.accepted_per_step,
        "drafted_positions": result.drafted, "accepted_positions": result.accepted,
        "rejected_positions": result.drafted - result.accepted,
    })
    if trace_rounds:
        record["rounds"] = result.rounds
    return record


def _record(mode, split, cache, codec, text, token_ids, prompt_tokens, seconds, local_s, cloud_s, session) -> dict:
    comm_s = max(0.0, seconds - local_s - cloud_s) if session is not None else 0.0
    return {
        "mode": mode, "split": split, "cache": cache, "codec": codec,
        "text": text, "token_ids": list(token_ids), "prompt_tokens": prompt_tokens, "new_tokens": len(token_ids),
        "bytes_up": session.bytes_up if session else 0,
        "bytes_down": session.bytes_down if session else 0,
        "round_trips": session.round_trips if session else 0,
        "seconds": seconds, "local_seconds": local_s, "cloud_seconds": cloud_s, "comm_seconds": comm_s,
        "tokens_per_second": len(token_ids) / seconds if seconds > 0 else 0.0,
    }
