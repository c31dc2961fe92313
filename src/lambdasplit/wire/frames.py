"""Frames of the lambdasplit session protocol (version 2). Full spec: docs/protocol.md.

Every frame: u32 length (of what follows, little-endian) | u8 type | body.

    HELLO    1  client -> server  JSON: protocol, role, model fingerprint, split, dtype, codec, token
    WELCOME  2  server -> client  JSON: session id, resume token, limits, capabilities
    STEP     3  client -> server  u32 seq | u32 position | u8 count | count tensor blobs   (LLM body sessions)
    RESULT   4  server -> client  u32 seq | u32 position | u32 server compute (us) | u8 count | blobs
    ERROR    5  either way        JSON: {"code": ..., "message": ...}
    CLOSE    6  client -> server  empty
    GENERATE 7  client -> server  JSON (cloud mode: the prompt text or `prompt_ids`, sampling options)
    TOKEN    8  server -> client  u32 token id | UTF-8 text piece (cloud mode stream)
    DONE     9  server -> client  JSON (cloud mode: text, token ids, server compute seconds)
    TABLES  12  client -> server  the `calK` codec's calibration tables, up then down (wire/calibrated.py), when WELCOME says tables_needed,
                                  right after WELCOME and before any STEP; nothing is answered
    REFINE  13  client -> server  u32 seq: the last RESULT's last position again, finer (a near-tie's precise
                                  vector under a lossy codec; answered by a RESULT: a calK refinement, else fp16)

Control frames carry small JSON objects; tensors are always raw blobs (wire/codecs.py),
never JSON lists, base64 or pickle.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import IntEnum

import torch

from lambdasplit.errors import LambdaSplitError, ProtocolError
from lambdasplit.wire.codecs import BlobHeader, Codec, decode_blob, encode, read_header

PROTOCOL_VERSION = 2
SUPPORTED_VERSIONS = (2,)  # what a server accepts in HELLO; version 1 had no sequence numbers
FRAME_HEADER = struct.Struct("<IB")  # length of (type + body), type


class FrameType(IntEnum):
    HELLO = 1
    WELCOME = 2
    STEP = 3
    RESULT = 4
    ERROR = 5
    CLOSE = 6
    GENERATE = 7
    TOKEN = 8
    DONE = 9
    TABLES = 12
    REFINE = 13


JSON_FRAMES = {FrameType.HELLO, FrameType.WELCOME, FrameType.ERROR, FrameType.GENERATE, FrameType.DONE}


@dataclass
class TensorStats:
    """Byte accounting of the tensors in one frame (the transport counts the total)."""

    payload_bytes: int = 0
    scale_bytes: int = 0


def frame(frame_type: FrameType, body: bytes = b"") -> bytes:
    return FRAME_HEADER.pack(len(body) + 1, int(frame_type)) + body


def json_frame(frame_type: FrameType, obj: dict) -> bytes:
    return frame(frame_type, json.dumps(obj, separators=(",", ":")).encode())


def error_frame(code: str, message: str) -> bytes:
    return json_frame(FrameType.ERROR, {"code": code, "message": message})


# Control frames are small, flat objects: anything deeper or with longer numbers is hostile.
MAX_JSON_DEPTH = 16
MAX_JSON_INT_DIGITS = 20


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"an integer of {len(text.lstrip('-'))} digits (at most {MAX_JSON_INT_DIGITS})")
    return int(text)


def _check_json_values(obj) -> None:
    """Depth at most MAX_JSON_DEPTH, and every string (key or value) valid UTF-8 (no lone surrogates)."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    stack.append((key, depth))
                stack.append((item, depth + 1))
        elif isinstance(value, str):
            value.encode("utf-8")  # raises UnicodeEncodeError on a lone surrogate such as "\ud800"


def parse_json(body: bytes | memoryview) -> dict:
    """A control frame's JSON object; anything else (bad UTF-8 or JSON, too deep, huge numbers) is bad_frame."""
    try:
        # NaN and +-Infinity stay accepted as Python's json writes them: diffusion scheduler
        # configs carry -Infinity.
        obj = json.loads(bytes(body).decode("utf-8"), parse_int=_json_int)
        _check_json_values(obj)
    except RecursionError:
        raise ProtocolError("bad_frame", f"control frame JSON is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeError, ValueError) as error:  # JSONDecodeError is a ValueError
        raise ProtocolError("bad_frame", f"control frame is not valid JSON: {error}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_frame", "control frame must be a JSON object")
    return obj


def tensors_body(prefix: bytes, tensors: list[torch.Tensor], codec: Codec, stats: TensorStats | None = None) -> bytes:
    parts = [prefix, struct.pack("<B", len(tensors))]
    for tensor in tensors:
        encoded = encode(tensor, codec)
        if stats is not None:
            stats.payload_bytes += encoded.payload_bytes
            stats.scale_bytes += encoded.scale_bytes
        parts.append(encoded.blob)
    return b"".join(parts)


def step_frame(position: int, tensors: list[torch.Tensor], codec: Codec, stats: TensorStats | None = None,
               seq: int = 1, keep=None, parents=None) -> bytes:
    """An LLM body STEP: `seq` counts the session's STEPs from 1; `position` is its first position;
    `keep` / `parents`: the tree sections (below), None for a chain step."""
    word, sections = encode_tree_fields(position, keep, parents)
    return frame(FrameType.STEP, tensors_body(struct.pack("<II", seq, word) + sections, tensors, codec, stats))


def blob_result_frame(seq: int, position: int, blob: bytes) -> bytes:
    """A RESULT of one already encoded blob (REFINE's answer: compute_us 0)."""
    return frame(FrameType.RESULT, struct.pack("<IIIB", seq, position, 0, 1) + blob)


RESULT_BLOB_AT = 13  # a one-tensor RESULT body's blob: after seq, position, compute_us and the count


def refine_frame(seq: int) -> bytes:
    """REFINE: ask again for the last position of the RESULT to STEP `seq` (the last one), finer."""
    return frame(FrameType.REFINE, struct.pack("<I", seq))


def parse_refine(body: memoryview) -> int:
    """The `seq` of a REFINE frame (exactly 4 bytes)."""
    if len(body) != 4:
        raise ProtocolError("bad_frame", f"a REFINE frame carries one u32 (4 bytes), got {len(body)}")
    return struct.unpack_from("<I", body, 0)[0]


def result_frame(position: int, compute_us: int, tensors: list[torch.Tensor], codec: Codec,
                 stats: TensorStats | None = None, seq: int = 1) -> bytes:
    prefix = struct.pack("<III", seq, position, min(compute_us, 2**32 - 1))
    return frame(FrameType.RESULT, tensors_body(prefix, tensors, codec, stats))


def parse_headers(body: memoryview, offset: int) -> list[BlobHeader]:
    """The tensor count and every blob's header, checked against the bytes present; nothing decoded."""
    if offset + 1 > len(body):
        raise ProtocolError("bad_frame", "frame too short for its tensor count")
    (count,) = struct.unpack_from("<B", body, offset)
    offset += 1
    headers = []
    for _ in range(count):
        headers.append(read_header(body, offset))
        offset = headers[-1].end
    if offset != len(body):
        raise ProtocolError("bad_frame", f"{len(body) - offset} unexpected bytes after the tensors")
    return headers


def parse_tensors(body: memoryview, offset: int, table=None) -> list[torch.Tensor]:
    return [decode_blob(body, header, table) for header in parse_headers(body, offset)]


# Tree sections of a body STEP (docs/protocol.md, "Tree steps"; llm/tree.py uses them)
# STEP := seq:u32  word:u32  [keep]  [parents]  count:u8  tensor x count
#   word: the position in bits 0..29; bit 31: a keep section follows; bit 30: a parents section follows
#   keep    := m:u16  index:u16 x m      the previous step's offsets to keep, a path, in order
#   parents := n:u16  parent:i16 x n     this step's tree (n = the tensor's positions)
KEEP_FLAG, PARENTS_FLAG, POSITION_MASK = 1 << 31, 1 << 30, (1 << 30) - 1


def encode_tree_fields(position: int, keep, parents) -> tuple[int, bytes]:
    """(the STEP's position word, the tree sections that follow it)."""
    if not 0 <= position <= POSITION_MASK:
        raise LambdaSplitError(f"a STEP position must be below 2^30, got {position}")
    word, sections = position, b""
    if keep is not None:
        word |= KEEP_FLAG
        sections += struct.pack(f"<H{len(keep)}H", len(keep), *keep)
    if parents is not None:
        word |= PARENTS_FLAG
        sections += struct.pack(f"<H{len(parents)}h", len(parents), *parents)
    return word, sections


def parse_tree_fields(body, word: int, offset: int):
    """(position, keep or None, parents or None, offset after them) of a STEP whose position word is `word`.
    Raises ProtocolError bad_frame when the sections do not fit the frame."""
    sections = []
    for flag, code in ((KEEP_FLAG, "H"), (PARENTS_FLAG, "h")):
        if not word & flag:
            sections.append(None)
            continue
        if offset + 2 > len(body):
            raise ProtocolError("bad_frame", "STEP too short for its tree section's count")
        (count,) = struct.unpack_from("<H", body, offset)
        if offset + 2 + 2 * count > len(body):
            raise ProtocolError("bad_frame", f"STEP too short for its {count} tree indices")
        sections.append(list(struct.unpack_from(f"<{count}{code}", body, offset + 2)))
        offset += 2 + 2 * count
    return word & POSITION_MASK, sections[0], sections[1], offset


def parse_tree_step(body: memoryview) -> tuple[int, int, list[BlobHeader], list | None, list | None]:
    """An LLM body STEP's (seq, position, blob headers, parents, keep): a server checks these before decoding."""
    if len(body) < 8:
        raise ProtocolError("bad_frame", "STEP frame too short for its sequence number and position")
    seq, word = struct.unpack_from("<II", body, 0)
    position, keep, parents, offset = parse_tree_fields(body, word, 8)
    return seq, position, parse_headers(body, offset), parents, keep


def parse_step_headers(body: memoryview) -> tuple[int, int, list[BlobHeader]]:
    """An LLM body STEP's (seq, position, blob headers), tree sections skipped."""
    seq, position, headers, _, _ = parse_tree_step(body)
    return seq, position, headers


def parse_step(body: memoryview) -> tuple[int, list[torch.Tensor]]:
    """(position, tensors) of an LLM body STEP, tree sections skipped (what captures and audits read)."""
    _, position, headers = parse_step_headers(body)
    return position, [decode_blob(body, header) for header in headers]


def parse_result_seq(body: memoryview, table=None) -> tuple[int, int, int, list[torch.Tensor]]:
    """(seq, position, compute_us, tensors) of an LLM body RESULT (`table`: the downlink's, for a `calK` codec)."""
    if len(body) < 12:
        raise ProtocolError("bad_frame", "RESULT frame too short")
    seq, position, compute_us = struct.unpack_from("<III", body, 0)
    return seq, position, compute_us, parse_tensors(body, 12, table)


def parse_result(body: memoryview) -> tuple[int, int, list[torch.Tensor]]:
    """(position, compute_us, tensors) of an LLM body RESULT."""
    _, position, compute_us, tensors = parse_result_seq(body)
    return position, compute_us, tensors


def token_frame(token_id: int, text: str) -> bytes:
    return frame(FrameType.TOKEN, struct.pack("<I", token_id) + text.encode("utf-8"))


def parse_token(body: memoryview) -> tuple[int, str]:
    if len(body) < 4:
        raise ProtocolError("bad_frame", "TOKEN frame too short")
    return struct.unpack_from("<I", body, 0)[0], bytes(body[4:]).decode("utf-8", errors="replace")
