"""The diffusion audit on a tiny random SD pipeline (CLIP text encoder, DDIM), over a real server."""

from __future__ import annotations

import json

import pytest

from lambdasplit.audit.diffusion import DiffusionAuditConfig, audit_diffusion, candidate_set, write_diffusion

PROMPTS = ["a handwritten digit seven", "the number 3"]
# more candidates than audited prompts, in another order: matching must pick the right one among them.
# (Distractors differ within the tiny tokenizer's 16 near-character tokens: "a handwritten digit one"
# would be truncated to the same ids as "... seven", a true collision.)
CANDIDATES = ["the number 8", "a picture of a seven", "the number 3", "the digit 5", "a handwritten digit seven"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from lambdasplit.diffusion.tiny import build_tiny_pipeline

    folder = build_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))
    config = DiffusionAuditConfig(model=str(folder), steps=5, sessions=2, local_steps=[0, 2], train_tokens=600,
                                  epochs=1, prompts=PROMPTS, candidates=CANDIDATES)
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


def test_matching_uses_the_given_candidate_set(report):
    assert report["meta"]["candidates"] == len(CANDIDATES)
    assert report["meta"]["candidate_set"].startswith("user-given")
    assert report["meta"]["audited_prompts_in_candidates"] == len(PROMPTS)


def test_default_candidates_are_the_public_prompt_set():
    from lambdasplit.zoo import digits_data

    audited = [digits_data.prompt(d) for d in range(10)]
    every, note = candidate_set(DiffusionAuditConfig(model="zoo:digits"), audited)
    assert every == digits_data.all_prompts()[0] and len(every) > len(audited) and set(audited) <= set(every)
    assert "all_prompts" in note
    # another model without a candidate file: the audited prompts, said plainly
    same, note = candidate_set(DiffusionAuditConfig(model="/some/pipeline"), audited)
    assert same == audited and "closed-world" in note
    given, note = candidate_set(DiffusionAuditConfig(model="zoo:digits", candidates=["x", "y"]), audited)
    assert given == ["x", "y"] and note.startswith("user-given")


def test_preview_curve_and_report_files(report, tmp_path):
    curve = report["preview_curve"]["client-latent psnr"]
    assert len(curve) == 5 and curve[-1] > curve[0]  # the x0 preview sharpens towards the final image
    paths = write_diffusion(report, tmp_path, "lambdasplit audit diffusion ...")
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["causal_text_encoder"] is True
    assert any(p.suffix == ".png" for p in paths)


def test_cli_audit_diffusion_on_a_tiny_pipeline(tmp_path):
    from lambdasplit.cli import main

    candidates = tmp_path / "candidates.txt"
    candidates.write_text("the number 5\n\na handwritten digit zero\n")
    assert main(["audit", "diffusion", "--model", "tiny:sd", "--steps", "3", "--prompts", "1", "--local-steps", "0",
                 "--protocol", "client-latent", "--candidates", str(candidates), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["candidates"] == 2  # the file's non-empty lines
    # the one audited prompt ("a handwritten digit zero") is among them and is matched
    assert [r for r in report["results"] if r["attack"] == "candidate matching"][0]["exact"] == 1.0
    replay = [r for r in report["results"] if r["attack"] == "replay"]
    assert replay and replay[0]["exact"] == 1.0
