"""Defenses: parsing, the mechanisms' arithmetic, their accounting, and that they act on the wire."""

from __future__ import annotations

import math
from pathlib import Path

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


@pytest.mark.parametrize("spec", ["gaussian:sigma=1,clip=5", "dpquant:bits=3,epsilon=1,clip=2"])
def test_defense_noise_is_unpredictable_without_a_seed(spec):
    """Two defended runs without a seed draw different noise; an explicit seed reproduces it."""
    hidden = torch.randn(1, 8, 32)
    first, second = parse_defense(spec).apply(hidden), parse_defense(spec).apply(hidden)
    assert not torch.equal(first, second)
    assert torch.equal(parse_defense(spec, seed=7).apply(hidden), parse_defense(spec, seed=7).apply(hidden))
    assert parse_defense(spec).accounting()["noise_seed"] == "secrets.randbits(63)"
    assert "removable" in parse_defense(spec, seed=7).accounting()["noise_seed"]


def test_generate_defense_ignores_the_sampling_seed():
    """`generate --seed` (sampling, default 0) must not seed the defense; only --defense-seed does."""
    from lambdasplit.cli import build_parser
    from lambdasplit.client.commands import _defense

    args = build_parser().parse_args(["generate", "--prompt", "x", "--seed", "0", "--defense", "gaussian:sigma=1,clip=5"])
    assert args.defense_seed is None
    hidden = torch.randn(1, 4, 16)
    a = _defense(args.defense, args.defense_seed, "split").apply(hidden)
    b = _defense(args.defense, args.defense_seed, "split").apply(hidden)
    assert not torch.equal(a, b)
    args = build_parser().parse_args(["generate", "--prompt", "x", "--defense", "gaussian:sigma=1,clip=5",
                                      "--defense-seed", "3"])
    assert torch.equal(_defense(args.defense, args.defense_seed, "split").apply(hidden),
                       _defense(args.defense, args.defense_seed, "split").apply(hidden))


def test_defense_refuses_cache_none(tiny_model_dir, capsys):
    """--cache none re-sends every position with fresh noise each step: averaging would remove it."""
    from lambdasplit.cli import main
    from lambdasplit.client.run import run_generation

    model = str(tiny_model_dir("llama", num_layers=4, hidden_size=64))
    with pytest.raises(LambdaSplitError, match="--cache kv"):
        run_generation(model=model, mode="split", split="1:3", server="127.0.0.1:9", prompt="hi", max_new_tokens=2,
                       cache="none", defense=GaussianDefense(1.0, 1.0))
    assert main(["generate", "--model", model, "--split", "1:3", "--server", "127.0.0.1:9", "--prompt", "hi",
                 "--cache", "none", "--defense", "dpquant:bits=2,epsilon=1,clip=1"]) == 2
    assert "--cache kv" in capsys.readouterr().err


def test_dpquant_is_2_to_the_b_ary_randomized_response():
    """k = 2^B levels; the level is kept with probability e^E / (e^E + 2^B - 1)."""
    bits, epsilon = 2, 1.0
    defense = DPQuantDefense(bits, epsilon, 1.0, seed=0)
    k = 2**bits
    assert len(defense.levels) == k
    keep = math.exp(epsilon) / (math.exp(epsilon) + k - 1)
    assert defense.keep == pytest.approx(keep)
    # -C rounds to level 0 with certainty, so the share of level 0 in the output is the keep probability
    out = defense.apply(torch.full((200_000,), -1.0))
    sent = out * (defense.keep - defense.other) + defense.other * defense.levels.sum()  # undo the debiasing
    level = ((sent + 1.0) / 2.0 * (k - 1)).round().long()
    assert float((level == 0).float().mean()) == pytest.approx(keep, abs=0.005)
    assert set(level.unique().tolist()) == set(range(k))
    # and the docs name it so: 2^B-ary, not "B-ary"
    import lambdasplit.audit.defenses as module

    text = (Path(__file__).parents[1] / "docs" / "privacy.md").read_text() + module.__doc__ + DPQuantDefense.__doc__
    assert "B-ary randomized" not in text.replace("2^B-ary randomized", "")
