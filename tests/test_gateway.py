"""The gateway's OpenAI-compatible API, through the official `openai` client, unchanged.

Real processes behind real sockets: a body server (`lambdasplit serve`) holding layers
1:3 of a tiny Llama, a U-Net server for a tiny Stable Diffusion pipeline, and
`lambdasplit gateway` in split mode over both. What the gateway answers is compared with
`lambdasplit generate`'s record (run_generation) and `imagine` for the same request.
"""

from __future__ import annotations

import base64
import contextlib
import io
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from lambdasplit.client.generation import Sampling
from lambdasplit.client.run import run_generation
from gateway_stack import SPLIT, body, gateway, model, pipeline, unet  # noqa: F401 (fixtures)

PROMPT = "the quick brown fox"
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def client(gateway):
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key="unused", max_retries=0)


def generate(model, body, prompt=PROMPT, max_new_tokens=12, chat=None, sampling=None) -> dict:
    """What `lambdasplit generate --json` prints for the same request."""
    return run_generation(model=model, mode="split", split=SPLIT, server=body, prompt=prompt,
                          max_new_tokens=max_new_tokens, chat=chat, sampling=sampling or Sampling())


def test_models_lists_the_served_models(client, model, pipeline):
    ids = [m.id for m in client.models.list().data]
    assert ids == [model, pipeline]


def test_greedy_chat_equals_generate_with_the_bytes_it_sent(client, model, body):
    expected = generate(model, body)
    reply = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=12)
    completion = reply.parse()
    assert completion.choices[0].message.content == expected["text"]
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.prompt_tokens == expected["prompt_tokens"]
    assert completion.usage.completion_tokens == expected["new_tokens"]
    assert completion.usage.total_tokens == expected["prompt_tokens"] + expected["new_tokens"]
    assert completion.choices[0].finish_reason == ("length" if expected["new_tokens"] == 12 else "stop")
    wire = completion.model_extra["lambdasplit"]
    assert (wire["mode"], wire["split"], wire["codec"], wire["server"]) == ("split", SPLIT, "fp32", body)
    # the same session, the same frames: the uplink bytes are those generate counts, to the byte
    assert wire["bytes_up"] == expected["bytes_up"]
    assert wire["round_trips"] == expected["round_trips"] == expected["new_tokens"]
    assert abs(wire["bytes_down"] - expected["bytes_down"]) <= 16  # WELCOME carries a session id
    headers = reply.headers
    assert int(headers["x-lambdasplit-bytes-up"]) == wire["bytes_up"]
    assert int(headers["x-lambdasplit-bytes-down"]) == wire["bytes_down"]
    assert headers["x-lambdasplit-split"] == SPLIT


def test_streamed_chat_equals_the_whole_answer(client, model, body):
    expected = generate(model, body)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": PROMPT}], temperature=0, max_tokens=12, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # it streamed
    assert "".join(pieces) == expected["text"]
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].model_extra["lambdasplit"]["bytes_up"] == expected["bytes_up"]
    assert chunks[-1].usage.completion_tokens == expected["new_tokens"]
    assert chunks[-1].choices == []


def test_text_completion_equals_generate_without_the_chat_template(client, model, body):
    expected = generate(model, body, chat=False, max_new_tokens=10)
    completion = client.completions.create(model=model, prompt=PROMPT, temperature=0, max_tokens=10)
    assert completion.choices[0].text == expected["text"]
    assert completion.usage.prompt_tokens == expected["prompt_tokens"]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=PROMPT, temperature=0, max_tokens=10, stream=True))
    assert streamed == expected["text"]


def test_seeded_sampling_equals_generate(client, model, body):
    expected = generate(model, body, sampling=Sampling(temperature=0.9, top_p=0.95, seed=5))
    completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                temperature=0.9, top_p=0.95, seed=5, max_tokens=12)
    assert completion.choices[0].message.content == expected["text"]


def test_concurrent_requests_equal_their_solo_outputs(client, model):
    prompts = [f"{word} and the lazy dog" for word in ("one", "two", "three", "four")]

    def ask(i: int) -> str:
        return client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompts[i]}], temperature=1.0, seed=i,
            max_tokens=16).choices[0].message.content

    solo = [ask(i) for i in range(len(prompts))]
    assert len(set(solo)) == len(solo)  # distinct answers, or a shared cache could go unnoticed
    together: list = [None] * len(prompts)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i))) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == solo


def test_stop_strings_end_the_answer_before_them(client, model, body):
    whole = generate(model, body, max_new_tokens=16)["text"]
    assert len(whole) > 6
    stop = whole[3:6]
    cut = whole[:whole.index(stop)]
    messages = [{"role": "user", "content": PROMPT}]
    completion = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16,
                                                stop=[stop])
    assert completion.choices[0].message.content == cut
    assert completion.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=16,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut


def test_multi_turn_chat_goes_through_the_chat_template(client, model, body):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi there"}, {"role": "user", "content": PROMPT}]
    ids = AutoTokenizer.from_pretrained(model).apply_chat_template(messages, add_generation_prompt=True)
    completion = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=4)
    assert completion.usage.prompt_tokens == len(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_bad_requests_get_openai_errors_and_the_gateway_keeps_serving(client, gateway, model):
    messages = [{"role": "user", "content": PROMPT}]
    with pytest.raises(openai.NotFoundError, match="not found"):
        client.chat.completions.create(model="no-such-model", messages=messages)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=model, messages=messages, temperature=5)
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.chat.completions.create(model=model, messages=messages, n=2)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="positions"):
        client.chat.completions.create(model=model, messages=messages, max_tokens=10**6)
    raw = httpx.post(f"{gateway}/v1/chat/completions", json={"model": model, "messages": "not a list"})
    assert raw.status_code == 400 and "messages" in raw.json()["error"]["message"]
    assert client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=2).choices


def test_unreachable_body_server_is_a_503_with_its_reason(model):
    from lambdasplit.gateway.app import create_app
    from lambdasplit.gateway.engines import TextEngine

    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    engine = TextEngine(model, split=SPLIT, servers=[dead])
    with serve_in_thread(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as raised:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                               stream=stream)
            assert raised.value.status_code == 503
            assert f"cannot connect to {dead}" in raised.value.message


@contextlib.contextmanager
def serve_in_thread(app):
    """The app under uvicorn on a real loopback socket, in a thread of this process."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("mode", ["local", "cloud"])
def test_local_and_cloud_modes_equal_generate(model, body, mode):
    from lambdasplit.gateway.app import create_app
    from lambdasplit.gateway.engines import TextEngine

    expected = run_generation(model=model, mode=mode, server=body, prompt=PROMPT, max_new_tokens=8,
                              sampling=Sampling())
    engine = TextEngine(model, mode=mode, servers=[body] if mode == "cloud" else [])
    with serve_in_thread(create_app(engine)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                    temperature=0, max_tokens=8)
        view = httpx.get(f"{url}/lambdasplit/requests/{completion.id}").json()
    assert completion.choices[0].message.content == expected["text"]
    wire = completion.model_extra["lambdasplit"]
    assert (wire["mode"], wire["split"], wire["codec"]) == (mode, None, None)
    if mode == "local":
        assert wire["bytes_up"] == wire["bytes_down"] == 0 and view["capture"] is None
    else:  # the prompt goes to the server: token ids in its GENERATE frame, the answer comes back as text
        assert wire["bytes_up"] > 0 and wire["round_trips"] == 1
        answer_down = next(r for r in view["capture"]["search"] if r["secret"] == "answer" and r["direction"] == "down")
        assert answer_down["coverage"] > 0.5  # in clear (JSON escapes non-ASCII, so not always verbatim)
        assert "server" in view["privacy"]["does_not_protect"][0]


def test_the_panel_view_comes_from_the_capture(client, gateway, model):
    completion = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                                temperature=0, max_tokens=6)
    wire = completion.model_extra["lambdasplit"]
    view = httpx.get(f"{gateway}/lambdasplit/requests/{wire['request_id']}").json()
    capture = view["capture"]
    assert capture["bytes_up"] == wire["bytes_up"] and capture["bytes_down"] == wire["bytes_down"]
    assert len(capture["steps_up"]) == len(capture["steps_down"]) == wire["round_trips"]
    assert capture["steps_up"][0] > capture["steps_up"][1]  # the prompt's step carries every prompt position
    assert capture["hex"].startswith("00000000  ") and capture["picture"].startswith("data:image/png;base64,")
    prompt_up = next(r for r in capture["search"] if r["secret"] == "prompt" and r["direction"] == "up")
    assert not prompt_up["verbatim"] and len(prompt_up["longest"]) < 6
    cloud_up = next(r for r in view["cloud_only"]["search"] if r["secret"] == "prompt" and r["direction"] == "up")
    assert cloud_up["verbatim"]
    assert "Not measured" in view["privacy"]["does_not_protect"][0]  # a tiny model: no audit figures claimed
    missing = httpx.get(f"{gateway}/lambdasplit/requests/nope")
    assert missing.status_code == 404


def test_image_generation_equals_imagine(client, gateway, pipeline, unet):
    from lambdasplit.diffusion.client import imagine

    response = client.images.generate(prompt="a red cat", response_format="b64_json", extra_body={"seed": 3,
                                                                                                  "steps": 4})
    from PIL import Image

    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))))
    expected = imagine(pipeline, "a red cat", server=unet, seed=3, steps=4)
    assert np.array_equal(got, np.asarray(expected.pil))
    wire = response.model_extra["lambdasplit"]
    assert wire["bytes_up"] == expected.record["bytes_up"]
    with pytest.raises(openai.BadRequestError, match="b64_json"):
        client.images.generate(prompt="x", response_format="url")


def test_privacy_figures_are_the_documented_ones():
    """The panel's figures are docs/privacy.md's table, cell for cell."""
    from lambdasplit.gateway.privacy import figures

    doc = (DOCS / "privacy.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 9 and cells[0] in ("uplink", "downlink"):
            rows[(cells[0], cells[1], cells[2])] = [float(re.match(r"([\d.]+)%", c).group(1)) for c in cells[5:]]
    keys = {"exact_inversion_prompt": ("uplink", "prompt", "exact-inversion"),
            "linear_probe_prompt": ("uplink", "prompt", "linear-probe"),
            "mlp_inverter_prompt": ("uplink", "prompt", "mlp-inverter"),
            "public_tail_generated": ("downlink", "generated", "public-tail"),
            "eavesdropper_prompt": ("uplink", "prompt", "utf8-substrings")}
    splits = figures()["llm"]["zoo:smollm2"]["splits"]
    assert list(splits) == ["1:29", "2:28", "4:26", "8:22"]
    for name, row in keys.items():
        assert [splits[s][name] for s in splits] == rows[row], name
