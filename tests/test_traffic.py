"""Traffic of a split session, in real socket bytes, against the theory.

With KV caches each generated token costs one hidden vector up and one down: 2 x D x
bytes per element, plus a few bytes of framing. int8 (per-token affine) roughly halves
that; without caching every step resends the whole sequence, so traffic grows with the
square of the length. Measured on a D = 256 model through a real server on loopback.
"""

from __future__ import annotations

import pytest

from lambdasplit.bench.llm import positions_sent
from lambdasplit.client import DeviceModel, RemoteBody
from lambdasplit.server import BodyServer, BodyService

D = 256
PROMPT = list(range(20, 34))  # 14 token ids, the paper's prompt length


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    folder = str(tiny_model_dir("llama", num_layers=3, hidden_size=D))
    with BodyServer([BodyService(folder, "1:2")]) as server:
        yield DeviceModel.load(folder, "1:2"), server


def session_bytes(setup, new_tokens: int, codec: str = "fp16", cache: str = "kv") -> int:
    device, server = setup
    with RemoteBody.for_device(device, server.address, codec=codec) as body:
        device.generate(list(PROMPT), body=body, max_new_tokens=new_tokens, cache=cache, ignore_eos=True)
        return body.bytes_up + body.bytes_down


def per_token(setup, codec: str) -> float:
    """Steady-state bytes per generated token: the difference of two session lengths."""
    return (session_bytes(setup, 24, codec) - session_bytes(setup, 8, codec)) / 16


def test_fp16_bytes_per_token_are_two_hidden_vectors(setup):
    theory = 2 * D * 2
    measured = per_token(setup, "fp16")
    assert abs(measured - theory) <= 0.03 * theory + 64, (measured, theory)


def test_int8_roughly_halves_the_traffic(setup):
    ratio = per_token(setup, "int8") / per_token(setup, "fp16")
    assert 0.45 <= ratio <= 0.6, ratio


def test_without_cache_traffic_grows_with_the_square_of_the_length(setup):
    lengths = (8, 16, 32)
    measured = {n: session_bytes(setup, n, cache="none") for n in lengths}
    # Positions resent per session: sum over steps of (prompt + step); 2 directions x D x 2 bytes each.
    theory = {n: positions_sent(len(PROMPT), n, "none") * 2 * D * 2 for n in lengths}
    for n in lengths:
        assert abs(measured[n] - theory[n]) <= 0.03 * theory[n], (n, measured[n], theory[n])
    # Quadratic, not linear: doubling the length more than doubles the increment.
    first, second = measured[16] - measured[8], measured[32] - measured[16]
    assert second > 2.5 * first
    with_cache = {n: session_bytes(setup, n) for n in lengths}
    assert with_cache[32] - with_cache[16] == pytest.approx(2 * (with_cache[16] - with_cache[8]), rel=0.01)
