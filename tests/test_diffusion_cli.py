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
from lambdasplit.diffusion.tiny import build_tiny_pipeline
from lambdasplit.server.process import ServerProcess

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("cli") / "sdxl", "sdxl")


@pytest.fixture(scope="module")
def unet_server(folder):
    with ServerProcess(["--component", "unet", "--model", str(folder)], env=ONE_THREAD) as server:
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


def test_imagine_cloud_mode_and_errors(folder, tmp_path, capsys):
    with ServerProcess(["--component", "pipeline", "--model", str(folder)], env=ONE_THREAD) as server:
        record = run_json(capsys, ["imagine", "--model", str(folder), "--prompt", "a cat", "--mode", "cloud",
                                   "--server", server.address, "--steps", "2", "--json", "--out", str(tmp_path / "c.png")])
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
