"""Real sessions over a real loopback server, captured as a sniffer on the link sees them.

The transport hands every chunk it writes to or reads from the TCP socket to a `capture`
list (TLS off: the worst case). Here those chunks are reassembled into the two byte
streams, split into frames exactly as the receiver would, and the tensors decoded: what
an eavesdropper on the link (or the cloud itself) holds after a session.

    Transcript   one session: the user's truth (prompt, ids, output) + the captured bytes
                 and the hidden states decoded from them, in position order
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import torch

from lambdasplit.client.generation import Sampling
from lambdasplit.client.run import run_generation
from lambdasplit.wire.frames import FRAME_HEADER, FrameType, parse_result, parse_step


@dataclass
class Transcript:
    """What one session was (ground truth) and what crossed the wire (the capture)."""

    prompt: str
    prompt_ids: list[int]
    content: tuple[int, int]  # [start, end) of the user's own text inside prompt_ids (the rest is the template)
    token_ids: list[int]  # generated tokens
    text: str  # generated text
    chunks: list[tuple[str, bytes]] = field(default_factory=list)
    up: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (start position, [n, D]) per STEP
    down: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (start position, [n, D]) per RESULT

    def stream(self, direction: str) -> bytes:
        return b"".join(data for d, data in self.chunks if d == direction)

    @property
    def sequence(self) -> list[int]:
        """Every token at every position: prompt, then generated."""
        return self.prompt_ids + self.token_ids

    def hidden(self, direction: str) -> torch.Tensor:
        """[positions, D] in position order; a later step at a position overrides an earlier one."""
        steps = self.up if direction == "up" else self.down
        length = max(start + t.shape[0] for start, t in steps)
        out = torch.zeros(length, steps[0][1].shape[-1])
        for start, tensor in steps:
            out[start:start + tensor.shape[0]] = tensor
        return out


def split_frames(stream: bytes) -> list[tuple[int, memoryview]]:
    """Cut a reassembled byte stream into (frame type, body), as the receiver does."""
    frames, offset, view = [], 0, memoryview(stream)
    while offset + FRAME_HEADER.size <= len(stream):
        length, frame_type = FRAME_HEADER.unpack_from(stream, offset)
        end = offset + 4 + length
        if end > len(stream):
            break  # a truncated last frame (connection cut): nothing more to read
        frames.append((frame_type, view[offset + FRAME_HEADER.size:end]))
        offset = end
    return frames


def decode_capture(transcript: Transcript) -> Transcript:
    """Fill `up` and `down` with the hidden states carried by STEP and RESULT frames."""
    for frame_type, body in split_frames(transcript.stream("up")):
        if frame_type == FrameType.STEP:
            position, tensors = parse_step(body)
            transcript.up.append((position, tensors[0][0]))
    for frame_type, body in split_frames(transcript.stream("down")):
        if frame_type == FrameType.RESULT:
            position, _, tensors = parse_result(body)
            transcript.down.append((position, tensors[0][0]))
    return transcript


def content_span(device, prompt: str) -> tuple[int, int]:
    """Where the user's text sits in the encoded prompt: what differs from an empty prompt."""
    full, empty = device.encode(prompt), device.encode("")
    start = 0
    while start < min(len(full), len(empty)) and full[start] == empty[start]:
        start += 1
    tail = 0
    while tail < len(empty) - start and full[-1 - tail] == empty[-1 - tail]:
        tail += 1
    return start, len(full) - tail


def run_session(device, address: str, prompt: str, *, mode: str, max_new_tokens: int, codec: str = "fp16",
                defense=None) -> Transcript:
    """One greedy session (EOS masked, so exactly `max_new_tokens` tokens), captured."""
    chunks: list[tuple[str, bytes]] = []
    record = run_generation(
        model=device.checkpoint, mode=mode, prompt=prompt, max_new_tokens=max_new_tokens,
        split=f"{device.split[0]}:{device.split[1]}" if mode == "split" else None, server=address, codec=codec,
        sampling=Sampling(), dtype=device.dtype_name, ignore_eos=True, device=device if mode == "split" else None,
        capture=chunks, defense=defense,
    )
    transcript = Transcript(prompt, device.encode(prompt), content_span(device, prompt), list(record["token_ids"]),
                            record["text"], chunks)
    return decode_capture(transcript) if mode == "split" else transcript


def int_runs(token_ids: list[int], length: int = 3) -> list[bytes]:
    """Every run of `length` consecutive token ids as little-endian int32 and int64 bytes."""
    runs = []
    for i in range(len(token_ids) - length + 1):
        window = token_ids[i:i + length]
        runs.append(struct.pack(f"<{length}i", *window))
        runs.append(struct.pack(f"<{length}q", *window))
    return runs
