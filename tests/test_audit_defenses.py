"""Defenses: parsing, the mechanisms' arithmetic, their accounting, and that they act on the wire."""

from __future__ import annotations

import math

import pytest
import torch

from lambdasplit.audit.defenses import DPQuantDefense, GaussianDefense, gaussian_epsilon, parse_defense, zcdp_epsilon
from lambdasplit.errors import LambdaSplitError


def test_parse_defense_specs_and_errors():
    assert parse_defense("none").name == "none"
    g = parse_defense("gaussian:sigma=0.5,clip=10")
    assert isinstance(g, GaussianDefense) and (g.sigma, g.clip) == (0.5, 10.0)
    q = parse_defense("dpquant:bits=4,epsilon=2,clip=3")
    assert isinstance(q, DPQuantDefense) and (q.bits, q.epsilon, q.clip) == (4, 2.0, 3.0)
    for bad in ("laplace:b=1", "gaussian:sigma=1", "gaussian:sigma=1,clip=2,x=3", "gaussian:sigma=a,clip=1",
                "dpquant:bits=12,epsilon=1,clip=1"):
        with pytest.raises(LambdaSplitError):
            parse_defense(bad)


def test_gaussian_clips_then_adds_noise_of_the_stated_scale():
    torch.manual_seed(0)
    hidden = torch.randn(1, 200, 64) * 10
    clipped = GaussianDefense(0.0, 5.0).apply(hidden)
    assert torch.allclose(clipped.norm(dim=-1), torch.full((1, 200), 5.0), atol=1e-4)
    noisy = GaussianDefense(2.0, 5.0).apply(hidden)
    assert abs(float((noisy - clipped).std()) - 2.0) < 0.1


def test_gaussian_epsilon_matches_the_analytic_mechanism():
    # Balle & Wang (2018), Theorem 8: delta(eps) = Phi(1/2 - eps) - e^eps Phi(-1/2 - eps) for sigma = sensitivity = 1
    eps = gaussian_epsilon(1.0, 1.0, 1e-5)
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    assert phi(0.5 - eps) - math.exp(eps) * phi(-0.5 - eps) == pytest.approx(1e-5, rel=1e-3)
    assert 4.2 < eps < 4.5
    assert gaussian_epsilon(1.0, 2.0) < eps  # more noise, smaller epsilon
    assert math.isinf(gaussian_epsilon(1.0, 0.0))
    assert zcdp_epsilon(0.5) > 0.5
    accounting = GaussianDefense(1.0, 0.5).accounting(positions=10)
    assert accounting["epsilon_all_positions"] > accounting["epsilon_per_vector"]


def test_dpquant_is_unbiased_inside_the_clip_range():
    values = torch.linspace(-0.9, 0.9, 16).expand(50000, 16).contiguous()
    out = DPQuantDefense(3, 1.0, 1.0, seed=1).apply(values)
    assert torch.allclose(out.mean(dim=0), values[0], atol=0.08)  # about 5 standard errors
    assert DPQuantDefense(3, 1.0, 1.0).accounting()["epsilon_per_coordinate"] == 1.0


def test_defense_changes_what_goes_up_on_the_wire(tiny_model_dir):
    from lambdasplit.audit.capture import run_session
    from lambdasplit.client.device import DeviceModel
    from lambdasplit.server import BodyServer, BodyService

    model = str(tiny_model_dir("llama", num_layers=4, hidden_size=64))
    device = DeviceModel.load(model, "1:3")
    with BodyServer([BodyService(model, "1:3")]) as server:
        plain = run_session(device, server.address, "hello there", mode="split", max_new_tokens=2, codec="fp32")
        clipped = run_session(device, server.address, "hello there", mode="split", max_new_tokens=2, codec="fp32",
                              defense=GaussianDefense(0.0, 1.0))
    assert torch.allclose(clipped.hidden("up").norm(dim=-1), torch.ones(len(clipped.hidden("up"))), atol=1e-4)
    assert not torch.allclose(plain.hidden("up"), clipped.hidden("up"))
