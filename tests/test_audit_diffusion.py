"""The diffusion audit on a tiny random SD pipeline (CLIP text encoder, DDIM), over a real server."""

from __future__ import annotations

import json

import pytest

from lambdasplit.audit.diffusion import DiffusionAuditConfig, audit_diffusion, write_diffusion


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from lambdasplit.diffusion.tiny import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))
    config = DiffusionAuditConfig(model=str(folder), steps=5, sessions=2, local_steps=[0, 2], train_tokens=600,
                                  epochs=1, prompts=["a handwritten digit seven", "the number 3"])
    return audit_diffusion(config, progress=False)


def _row(report, protocol, k, attack):
    (row,) = [r for r in report["results"]
              if r["protocol"] == protocol and r["local_steps"] == k and r["attack"] == attack]
    return row


@pytest.mark.parametrize("protocol", ["cloud-latent", "client-latent"])
def test_replay_rebuilds_the_users_image_exactly(report, protocol):
    assert _row(report, protocol, 0, "replay")["exact"] == 1.0
    # keeping the last steps on the device stops the replay alone ...
    assert _row(report, protocol, 2, "replay")["exact"] == 0.0
    # ... but not whoever holds the U-Net: it finishes the steps from the captured conditioning
    assert _row(report, protocol, 2, "replay + U-Net completion")["exact"] == 1.0


@pytest.mark.parametrize("protocol", ["cloud-latent", "client-latent"])
def test_prompt_recovered_from_text_embeddings(report, protocol):
    assert _row(report, protocol, 0, "exact causal search")["top1"] == 1.0
    assert _row(report, protocol, 0, "candidate matching")["exact"] == 1.0
    for direction in ("uplink", "downlink"):
        assert _row(report, protocol, 0, f"utf8-substrings ({direction})")["exact"] == 0.0


def test_preview_curve_and_report_files(report, tmp_path):
    curve = report["preview_curve"]["client-latent psnr"]
    assert len(curve) == 5 and curve[-1] > curve[0]  # the x0 preview sharpens towards the final image
    paths = write_diffusion(report, tmp_path, "lambdasplit audit diffusion ...")
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["causal_text_encoder"] is True
    assert any(p.suffix == ".png" for p in paths)


def test_cli_audit_diffusion_on_a_tiny_pipeline(tmp_path):
    from lambdasplit.cli import main

    assert main(["audit", "diffusion", "--model", "tiny:sd", "--steps", "3", "--prompts", "1", "--local-steps", "0",
                 "--protocol", "client-latent", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    replay = [r for r in report["results"] if r["attack"] == "replay"]
    assert replay and replay[0]["exact"] == 1.0
