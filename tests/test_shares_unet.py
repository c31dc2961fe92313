"""Secret-shared U-Net (issue #15): zoo:digits through two shares servers against the unsplit pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lambdasplit.diffusion.client import imagine
from lambdasplit.server import BodyServer
from lambdasplit.shares import ring
from lambdasplit.shares.audit import parse_capture
from lambdasplit.shares.layers import fixed_conv
from lambdasplit.shares.service import SharesService
from lambdasplit.shares.unet import imagine_shared, load_device


def test_ring_convolution_is_exact():
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.uniform_(-2, 2)
    layer = fixed_conv(0, "conv", conv)
    rng = np.random.default_rng(0)
    shares = rng.integers(0, 2**64, (2, 3, 5, 5), dtype=np.uint64)
    out = layer.matmul(shares, add_bias=True)
    w = torch.round(conv.weight.double() * 2 ** ring.FRAC_W).long().numpy()
    b = torch.round(conv.bias.double() * 2 ** ring.FRAC_Y).long().numpy()
    padded = np.pad(shares, ((0, 0), (0, 0), (1, 1), (1, 1)))
    for batch, channel, i, j in ((0, 0, 0, 0), (1, 3, 2, 1), (1, 2, 1, 2)):
        window = padded[batch, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3]
        expected = (sum(int(a) * int(c) for a, c in zip(window.ravel(), w[channel].ravel())) + int(b[channel])) % 2**64
        assert int(out[batch, channel, i, j]) == expected


@pytest.fixture(scope="module")
def hosts(digits_path):
    servers = [BodyServer([SharesService(str(digits_path), i)], port=0).start_in_thread() for i in (0, 1)]
    yield [s.address for s in servers]
    for server in servers:
        server.stop()


def test_digits_image_within_40_db_of_the_unsplit_pipeline(digits_path, hosts):
    device = load_device(str(digits_path))
    captures = [[], []]
    result = imagine_shared(device, "a handwritten digit seven", servers=hosts, steps=6, captures=captures)
    reference = imagine(str(digits_path), "a handwritten digit seven", mode="local", steps=6)
    mse = float(np.mean((result.image - reference.image) ** 2))
    psnr = 10 * np.log10(1.0 / mse) if mse > 0 else float("inf")
    assert psnr >= 40, psnr
    record = result.record
    assert record["protocol"] == "shared" and record["round_trips_per_step"] > 50
    assert record["bytes_up_per_server"][1] < record["bytes_up_per_server"][0] / 100  # B gets no inputs
    # what server 0 received is uniform bytes: nothing of the latent or the prompt. The shares only
    # (frame and request headers are not random), after the describe request; a conv request's
    # payload starts with its 4-byte spatial header, the shares are 8-byte words
    requests, _ = parse_capture(captures[0])
    up = b"".join(r["payload"][len(r["payload"]) % 8:] for r in requests[1:])
    counts = np.bincount(np.frombuffer(up[-2_000_000:], dtype=np.uint8), minlength=256)
    from scipy import stats

    assert stats.chisquare(counts).pvalue > 1e-4


def test_imagine_protocol_shared_cli(digits_path, hosts, tmp_path, capsys):
    import json

    from lambdasplit.cli import main

    out = tmp_path / "seven.png"
    common = ["imagine", "--model", str(digits_path), "--prompt", "a handwritten digit seven", "--steps", "2", "--json"]
    assert main([*common, "--protocol", "shared", "--servers", ",".join(hosts), "--out", str(out)]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["protocol"] == "shared" and len(record["bytes_up_per_server"]) == 2 and out.exists()
    assert main([*common, "--protocol", "shared", "--servers", hosts[0], "--out", str(out)]) != 0
    assert "exactly two" in capsys.readouterr().err
