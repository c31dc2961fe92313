"""Perplexity of a causal LM on a text: strided sliding windows, as in the Hugging Face docs.

The text is tokenized once without special tokens. Windows of `window` tokens advance by
`stride`; each window scores only the tokens no earlier window scored, so every token after the
first is scored exactly once with at least `window - stride` tokens of context (except near the
start). ppl = exp(mean negative log-likelihood per scored token).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch


def _load(model_path_or_id: str | Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lambdasplit.zoo.registry import resolve

    path = resolve(str(model_path_or_id))  # zoo:NAME -> cached folder; Hub ids / folders unchanged
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return model, tokenizer


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # stderr, so machine-readable output on stdout stays clean
    return Progress(
        TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled, transient=True,
    )


@torch.inference_mode()
def perplexity(
    model_path_or_id,
    text: str,
    *,
    tokenizer=None,
    max_tokens: int | None = None,
    window: int = 1024,
    stride: int = 512,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
) -> dict:
    """Return {"tokens": scored tokens, "nll": mean NLL in nats, "ppl": perplexity, ...}.

    `model_path_or_id` is a Hub id, a local folder, `zoo:NAME`, or an already loaded causal LM
    (then pass its `tokenizer`). `max_tokens` keeps only the first N tokens of the text.
    """
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    if isinstance(model_path_or_id, (str, Path)):
        name = str(model_path_or_id)
        model, tokenizer = _load(model_path_or_id, dtype)
    else:
        model, name = model_path_or_id, model_path_or_id.name_or_path
        if tokenizer is None:
            raise ValueError("pass tokenizer= with an already loaded model")

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # verbose: no length warning
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens; nothing to score")
    ids = torch.tensor(ids)
    n = len(ids)

    started = time.perf_counter()
    starts = list(range(0, max(n - window, 0) + stride, stride))  # last window reaches the end
    total_nll, scored, prev_end = 0.0, 0, 0
    with _progress(progress) as bar:
        task = bar.add_task("windows", total=len(starts))
        for begin in starts:
            end = min(begin + window, n)
            new = end - max(prev_end, begin + 1)  # targets not scored by an earlier window
            chunk = ids[begin:end].unsqueeze(0)
            # logits_to_keep: only the last new+1 positions are needed, so the LM head skips the overlap
            logits = model(chunk, logits_to_keep=new + 1).logits[0, :-1].float()
            targets = chunk[0, -new:]
            total_nll -= torch.log_softmax(logits, -1).gather(1, targets[:, None]).sum().item()
            scored += new
            prev_end = end
            bar.advance(task)
            if end == n:
                break

    nll = total_nll / scored
    return {
        "model": name,
        "tokens": scored,
        "nll": nll,
        "ppl": math.exp(nll),
        "window": window,
        "stride": stride,
        "seconds": time.perf_counter() - started,
    }
