"""What crossed the wire for one request, for the page's panel: from the real capture.

The transport hands every chunk it wrote to or read from the socket to a capture list
(audit/capture.py reassembles them the same way). From it: the size of every frame in
order (the chart), a hex dump of the first STEP frame, the hidden state (or predicted
noise) it carried drawn as a picture, and the eavesdropper's search of both byte
streams for the prompt and the answer (audit/attacks.py, the audit's own search).

`cloud_only_frames` builds, with the same frame encoder, the GENERATE frame cloud-only
mode would have sent for the same request (prompt text in clear): shown side by side,
and labelled as built, not sent.
"""

from __future__ import annotations

import base64
import io

import numpy as np

from lambdasplit.audit.attacks import visible_text
from lambdasplit.audit.capture import int_runs, split_frames
from lambdasplit.wire.frames import FrameType, json_frame

HEX_BYTES = 256  # bytes of a frame shown in the hex dump


def frame_name(frame_type: int) -> str:
    try:
        return FrameType(frame_type).name
    except ValueError:
        return str(frame_type)


def hex_dump(data: bytes, limit: int = HEX_BYTES) -> str:
    """`offset  hex bytes  |printable|`, 16 bytes a line, as xxd prints it."""
    lines = []
    for offset in range(0, min(len(data), limit), 16):
        chunk = data[offset:offset + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{offset:08x}  {chunk.hex(' '):<47}  |{text}|")
    if len(data) > limit:
        lines.append(f"... {len(data) - limit} more bytes")
    return "\n".join(lines)


def picture(matrix: np.ndarray, scale: int = 1, row_scale: int = 1) -> str:
    """A 2-D array as a grey PNG (data URL). Clipped at the 1st/99th percentiles: a few hidden
    channels are orders of magnitude larger than the rest and would turn everything else grey."""
    from PIL import Image

    low, high = np.percentile(matrix, [1, 99]) if matrix.size else (0.0, 1.0)
    x = np.clip((matrix - low) / ((high - low) or 1.0), 0, 1)
    pixels = (x * 255).round().astype(np.uint8)
    pixels = pixels.repeat(scale * row_scale, 0).repeat(scale, 1)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def search(streams: dict[str, bytes], secrets: dict[str, str], token_ids: dict[str, list[int]] | None = None) -> list:
    """For each secret text and each direction: the longest visible substring (>= 4 characters),
    whether it is there verbatim, and whether 3 consecutive token ids appear (int32/int64 or as JSON)."""
    found = []
    for name, text in secrets.items():
        ids = (token_ids or {}).get(name, [])
        runs = int_runs(ids) + [", ".join(map(str, ids[i:i + 3])).encode() for i in range(len(ids) - 2)]
        for direction, stream in streams.items():
            seen = visible_text(stream, text) if text else {"coverage": 0.0, "longest": "", "verbatim": False}
            found.append({"secret": name, "direction": direction, "coverage": seen["coverage"],
                          "longest": seen["longest"], "verbatim": seen["verbatim"],
                          "token_id_runs": any(run in stream for run in runs)})
    return found


def describe(capture: list[tuple[str, bytes]], secrets: dict[str, str], token_ids: dict | None = None,
             tensor_picture=None) -> dict:
    """The panel's view of one captured session. `tensor_picture(frame_body)` draws a STEP's tensor."""
    streams = {d: b"".join(data for direction, data in capture if direction == d) for d in ("up", "down")}
    frames = []
    for direction in ("up", "down"):
        for frame_type, body in split_frames(streams[direction]):
            frames.append({"direction": direction, "type": frame_name(frame_type), "bytes": len(body) + 5})
    # the chart's steps: STEP frames up and RESULT frames down, in order (one pair per model step)
    up = [f["bytes"] for f in frames if f["direction"] == "up" and f["type"] == "STEP"]
    down = [f["bytes"] for f in frames if f["direction"] == "down" and f["type"] == "RESULT"]
    view = {"bytes_up": len(streams["up"]), "bytes_down": len(streams["down"]),
            "frames": len(frames), "steps_up": up, "steps_down": down,
            "search": search(streams, secrets, token_ids), "hex": "", "hex_frame": None, "picture": None}
    first_step = _first_frame(streams["up"], FrameType.STEP)
    if first_step is not None:
        offset, body = first_step
        view["hex"] = hex_dump(streams["up"][offset:offset + 5 + len(body)])
        view["hex_frame"] = f"the first STEP frame ({5 + len(body)} bytes, uplink)"
        if tensor_picture is not None:
            view["picture"] = tensor_picture(body)
    elif streams["up"]:
        view["hex"] = hex_dump(streams["up"])
        view["hex_frame"] = "the start of the uplink"
    return view


def _first_frame(stream: bytes, wanted: FrameType):
    """(offset of its header, body) of the first frame of type `wanted` in the stream, or None."""
    offset = 0
    for frame_type, body in split_frames(stream):
        if frame_type == wanted:
            return offset, body
        offset += 5 + len(body)
    return None


def cloud_only_frames(request: dict) -> bytes:
    """The GENERATE frame cloud-only mode sends for this request (CloudClient's, built, not sent)."""
    return json_frame(FrameType.GENERATE, request)


def cloud_only_view(prompt_text: str, answer: str, max_new_tokens: int, sampling: dict) -> dict:
    """What cloud-only mode would have put on the wire in clear: the prompt up, the answer down."""
    up = cloud_only_frames({"max_new_tokens": max_new_tokens, "sampling": sampling, "cache": "kv",
                            "ignore_eos": False, "chat": None, "prompt": prompt_text})
    # the DONE frame alone carries the whole answer (TOKEN frames carry it again, piece by piece)
    down = json_frame(FrameType.DONE, {"text": answer})
    streams = {"up": up, "down": down}
    return {"hex": hex_dump(up), "bytes_up": len(up), "search": search(streams, {"prompt": prompt_text,
                                                                               "answer": answer}),
            "note": "built with the same frame encoder as `generate --mode cloud`, not sent"}


def llm_hidden_picture(body: memoryview) -> str:
    """A STEP's hidden state [1, n, D] as a picture: positions down, channels across."""
    from lambdasplit.wire.frames import parse_step

    _, tensors = parse_step(body)
    x = tensors[0][0].float().numpy()
    # at least a third as tall as wide: a short prompt is a few rows of hundreds of channels
    return picture(x, row_scale=max(1, round(x.shape[1] / (3 * x.shape[0]))))
