"""Module-scoped fixtures of the gateway tests: real processes behind real sockets.

A body server (`lambdasplit serve`) holding layers 1:3 of a tiny Llama, a U-Net server
for a tiny Stable Diffusion pipeline, and `lambdasplit gateway` in split mode over both.
Import the fixtures by name into a test module.
"""

from __future__ import annotations

import pytest

from lambdasplit.gateway.process import GatewayProcess
from lambdasplit.server.process import ServerProcess

SPLIT = "1:3"


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> str:
    return str(tiny_model_dir("llama", num_layers=4))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> str:
    from lambdasplit.diffusion.tiny import build_tiny_pipeline

    return str(build_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "sd", "sd"))


@pytest.fixture(scope="module")
def body(model):
    with ServerProcess(["--model", model, "--layers", SPLIT, "--cloud"]) as server:  # split and cloud mode
        yield server.address


@pytest.fixture(scope="module")
def unet(pipeline):
    with ServerProcess(["--component", "unet", "--model", pipeline]) as server:
        yield server.address


@pytest.fixture(scope="module")
def gateway(model, pipeline, body, unet):
    with GatewayProcess(["--model", model, "--split", SPLIT, "--server", body,
                         "--image-model", pipeline, "--image-server", unet]) as process:
        yield process.url
