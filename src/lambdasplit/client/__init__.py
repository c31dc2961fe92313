"""The device runtime: what runs on the user's machine.

    generation.py  the one generation loop and sampler (every mode)
    device.py      DeviceModel: tokenizer + head + tail; InProcessBody
    remote.py      RemoteBody (split mode) and CloudClient (cloud-only mode) sessions
    commands.py    `lambdasplit generate` and `lambdasplit demo`
    hf_model.py    SplitModelForCausalLM: the same split behind transformers' generate()
"""

from lambdasplit.client.device import BodyChain, DeviceModel, InProcessBody
from lambdasplit.client.generation import GenerationResult, Sampling
from lambdasplit.client.remote import CloudClient, RemoteBody

__all__ = ["BodyChain", "DeviceModel", "InProcessBody", "GenerationResult", "Sampling", "CloudClient", "RemoteBody"]
