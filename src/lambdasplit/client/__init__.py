"""The device runtime: what runs on the user's machine.

    generation.py  the one generation loop and sampler (every mode)
    device.py      DeviceModel: tokenizer + head + tail; InProcessBody
    remote.py      RemoteBody (split mode) and CloudClient (cloud-only mode) sessions
    commands.py    `lambdasplit generate` and `lambdasplit demo`
    hf_model.py    SplitModelForCausalLM: the same split behind transformers' generate()
"""

import importlib

# Imported on first use, so that `lambdasplit --help` and usage errors need neither torch nor transformers.
_EXPORTS = {
    "BodyChain": "lambdasplit.client.device",
    "DeviceModel": "lambdasplit.client.device",
    "InProcessBody": "lambdasplit.client.device",
    "GenerationResult": "lambdasplit.client.generation",
    "Sampling": "lambdasplit.client.generation",
    "CloudClient": "lambdasplit.client.remote",
    "RemoteBody": "lambdasplit.client.remote",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
