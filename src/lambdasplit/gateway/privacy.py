"""What the split does not hide, in the page's words, from the audit's measured figures.

The figures (data/privacy_figures.json) are those of docs/privacy.md, measured by the
commands recorded beside them; tests/test_gateway.py checks they still match that page.
For a model or split the audit did not measure, the statement says so and gives the
bundled model's figures as the nearest measurement, never a better claim.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources


@cache
def figures() -> dict:
    return json.loads(resources.files("lambdasplit.gateway").joinpath("data/privacy_figures.json").read_text())


def text_statement(model: str, mode: str, split: str | None) -> dict:
    """{"protects": [...], "does_not_protect": [...], "measured": {...} | None, "source": ...}"""
    source = figures()["source"]
    if mode == "local":
        return {"protects": ["Nothing crosses a network: the prompt and the answer stay in this process."],
                "does_not_protect": [], "measured": None, "source": source}
    if mode == "cloud":
        return {"protects": [],
                "does_not_protect": ["Cloud-only mode: the server receives the prompt (as token ids that anyone "
                                     "decodes with the public tokenizer) and sends the answer back as text. The "
                                     "server, and the link without TLS, see everything."],
                "measured": None, "source": source}
    audited = figures()["llm"].get(model)
    measured = audited["splits"].get(split) if audited else None
    protects = ["Someone on the link who does not have the model finds no prompt or answer text and no token "
                "ids in the bytes (the search above runs the audit's test on this request's capture)."]
    if measured:
        where = f"measured for {model} at split {split}"
        does_not = [
            f"Anyone with the public weights, the server that runs the body included, recovers "
            f"{measured['exact_inversion_prompt']:.1f}% of the prompt tokens from the uplink (exact inversion "
            f"through the public head layers) and {measured['public_tail_generated']:.1f}% of the answer "
            f"from the downlink (the public tail): {where}.",
            f"Without any search, a linear probe onto the public embedding table reads "
            f"{measured['linear_probe_prompt']:.1f}% of the prompt tokens, and an inverter trained on public "
            f"text {measured['mlp_inverter_prompt']:.1f}%.",
            "TLS (--tls-ca) hides the bytes from the link, not from the server.",
        ]
        return {"protects": protects, "does_not_protect": does_not, "measured": {"model": model, "split": split,
                **measured, "command": audited["command"], "setting": audited["setting"]}, "source": source}
    bundled = figures()["llm"]["zoo:smollm2"]["splits"]
    low = min(v["exact_inversion_prompt"] for v in bundled.values())
    high = max(v["exact_inversion_prompt"] for v in bundled.values())
    does_not = [
        f"Not measured for {model} at split {split}. On the bundled zoo:smollm2 (splits "
        f"{', '.join(bundled)}), anyone with the public weights recovers {low:.1f}-{high:.1f}% of the prompt "
        f"tokens and 100.0% of the answer; assume the same here when the weights are public: the split does not "
        f"hide the prompt or the answer from the server.",
        "Run `lambdasplit audit llm --model ... --splits X` to measure this model.",
    ]
    return {"protects": protects, "does_not_protect": does_not, "measured": None, "source": source}


def image_statement(model: str | None) -> dict:
    source = figures()["source"]
    audited = figures()["diffusion"].get(model or "")
    protects = ["Someone on the link without the pipeline sees noise tensors, not the prompt text (search above)."]
    if audited:
        k0 = audited["cloud_latent_k0"]
        does_not = [f"Anyone with the public pipeline, the server that runs the U-Net included, rebuilds the exact "
                    f"final image ({k0['final_image_exact']:.1f}% of audited images) and finds the prompt among "
                    f"candidates ({k0['prompt_by_matching_exact']:.1f}%): measured for {model}."]
        measured = {"model": model, **k0, "command": audited["command"]}
    else:
        does_not = [f"Not measured for {model}. On the bundled zoo:digits, anyone with the public pipeline "
                    f"rebuilds the exact final image and the prompt; assume the same here."]
        measured = None
    return {"protects": protects, "does_not_protect": does_not, "measured": measured, "source": source}
