"""CLI contract of split diffusion against real `lambdasplit serve` processes:
`imagine --json` keys, the PNG equals the unsplit pipeline's, `--show-wire`, cloud mode,
`bench diffusion` outputs, and one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lambdasplit.cli import main
from lambdasplit.diffusion.client import LLM_ONLY_KEYS, RECORD_KEYS
from lambdasplit.diffusion.tiny import build_tiny_pipeline
from lambdasplit.server.process import ServerProcess

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# `generate --json` keys, read off client/run.py: _record's, plus payload_bytes and scale_bytes (split mode)
GENERATE_KEYS = {
    "mode", "split", "cache", "codec", "text", "token_ids", "prompt_tokens", "new_tokens", "bytes_up", "bytes_down",
    "round_trips", "seconds", "local_seconds", "cloud_seconds", "comm_seconds", "tokens_per_second",
    "payload_bytes", "scale_bytes",
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("cli") / "sdxl", "sdxl")


@pytest.fixture(scope="module")
def unet_server(folder):
    with ServerProcess(["--component", "unet", "--model", str(folder)], env=ONE_THREAD) as server:
        yield server.address


@pytest.fixture(scope="module")
def pipeline_server(folder):
    with ServerProcess(["--component", "pipeline", "--model", str(folder)], env=ONE_THREAD) as server:
        yield server.address


def run_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_imagine_split_json_png_and_wire_picture(folder, unet_server, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "cat.png"
    record = run_json(capsys, ["imagine", "--model", str(folder), "--prompt", "a cat", "--server", unet_server,
                               "--steps", "3", "--seed", "5", "--json", "--out", str(out)])
    for key in ("bytes_up", "bytes_down", "round_trips", "seconds", "local_seconds", "cloud_seconds", "comm_seconds",
                "payload_bytes", "payload_bytes_down", "scale_bytes_down", "framing_bytes", "noise_payload_bytes_per_step"):
        assert key in record, key
    assert record["round_trips"] == 1 and record["protocol"] == "cloud-latent"
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a cat", num_inference_steps=3, guidance_scale=4.0, generator=torch.Generator().manual_seed(5)).images[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))

    record = run_json(capsys, ["imagine", "--model", str(folder), "--prompt", "a cat", "--server", unet_server,
                               "--steps", "3", "--codec", "int2", "--protocol", "client-latent", "--show-wire", "1",
                               "--json", "--out", str(tmp_path / "wire.png")])
    picture = np.asarray(Image.open(record["wire_picture"]))
    assert picture.shape == (8 * 8, 8 * 4 * 8)  # 4 latent channels side by side, 8x upscaled
    assert len(np.unique(picture)) <= 4  # int2: what crossed the wire has 4 levels
    assert record["noise_payload_bytes_per_step"] == 4 * 8 * 8 * 2 // 8


def test_imagine_json_keys_are_the_same_in_every_mode_and_match_generate(folder, unet_server, pipeline_server,
                                                                         tmp_path, capsys):
    """Every key of generate --json that applies to an image, with the same name; the LLM-only ones absent."""
    assert set(LLM_ONLY_KEYS) <= GENERATE_KEYS
    shared = GENERATE_KEYS - set(LLM_ONLY_KEYS)
    common = ["imagine", "--model", str(folder), "--prompt", "a cat", "--steps", "2", "--json"]
    records = {
        "local": run_json(capsys, [*common, "--mode", "local", "--out", str(tmp_path / "l.png")]),
        "split": run_json(capsys, [*common, "--server", unet_server, "--codec", "int8", "--verify-sync",
                                   "--out", str(tmp_path / "s.png")]),
        "client-latent": run_json(capsys, [*common, "--server", unet_server, "--protocol", "client-latent",
                                           "--out", str(tmp_path / "c.png")]),
        "cloud": run_json(capsys, [*common, "--mode", "cloud", "--server", pipeline_server,
                                   "--out", str(tmp_path / "k.png")]),
    }
    for mode, record in records.items():
        assert set(record) == set(RECORD_KEYS) | {"out"}, mode
        assert shared <= set(record) and not set(LLM_ONLY_KEYS) & set(record), mode
        assert record["scale_bytes"] == record["scale_bytes_up"] + record["scale_bytes_down"], mode
        blobs = sum(record[k] for k in ("payload_bytes", "scale_bytes", "blob_header_bytes", "sync_bytes_down"))
        assert record["bytes_up"] + record["bytes_down"] == blobs + record["framing_bytes"], mode
    assert records["split"]["scale_bytes"] == 2 * 8 and records["split"]["sync_bytes_down"] == 2 * 136
    assert records["local"]["bytes_up"] == 0 and records["local"]["cloud_steps"] == 0
    cloud = records["cloud"]
    assert cloud["payload_bytes_down"] == 16 * 16 * 3 * 4 and cloud["cloud_steps"] == 2  # the fp32 image
    assert cloud["loaded"] == [] and cloud["load_seconds"] >= 0


def test_imagine_cloud_mode_and_errors(folder, pipeline_server, tmp_path, capsys):
    record = run_json(capsys, ["imagine", "--model", str(folder), "--prompt", "a cat", "--mode", "cloud",
                               "--server", pipeline_server, "--steps", "2", "--json", "--out", str(tmp_path / "c.png")])
    assert record["mode"] == "cloud" and record["round_trips"] == 1 and record["bytes_up"] > 0
    capsys.readouterr()
    assert main(["imagine", "--model", str(folder), "--prompt", "a cat", "--out", str(tmp_path / "x.png")]) == 2
    assert "split mode needs --server" in capsys.readouterr().err


def test_bench_diffusion_writes_tables_and_grid(folder, tmp_path, capsys):
    result = run_json(capsys, ["bench", "diffusion", "--model", str(folder), "--steps", "2", "--codecs", "fp16,int8,int2",
                               "--prompt", "a cat", "--prompt", "a dog", "--out", str(tmp_path), "--json"])
    rows = {row["codec"]: row for row in result["rows"]}
    assert list(rows) == ["fp32", "fp16", "int8/tensor", "int2/tensor"]
    assert rows["int8/tensor"]["noise_bytes_per_step"] * 4 == rows["fp32"]["noise_bytes_per_step"]
    assert rows["fp32"]["psnr_db"] == "inf" and rows["int2/tensor"]["psnr_db"] < rows["fp16"]["psnr_db"]
    assert result["cheapest_codec"] in rows
    for name in ("table.md", "table.csv", "table.json", "run.json", "grid.png"):
        assert (tmp_path / name).is_file()


def test_bench_diffusion_modes_table(folder, tmp_path, capsys):
    """`bench diffusion --modes`: the mode table of docs/diffusion.md, from real server processes."""
    result = run_json(capsys, ["bench", "diffusion", "--model", str(folder), "--modes", "--steps", "2", "--repeat", "1",
                               "--prompt", "a cat", "--out", str(tmp_path), "--json"])
    rows = {row["mode"].split(" (")[0]: row for row in result["rows"]}
    assert list(rows) == ["local", "split cloud-latent", "split cloud-latent, int8", "split client-latent",
                          "split, last 1 steps local", "cloud"]
    assert [r["round_trips"] for r in rows.values()] == [0, 1, 1, 2, 1, 1]
    # fp32 everywhere but the int8 row: the same image in every mode
    assert [r["same_image_as_local"] for r in rows.values()] == [True, True, False, True, True, True]
    assert rows["local"]["bytes_up"] == 0 and result["repeat"] == 1
    assert (tmp_path / "table.md").is_file()
