"""`lambdasplit demo`: split generation over a real loopback server, and what crossed the wire.

It starts `lambdasplit serve` as a separate process holding only the body layers,
generates on this side with the head and tail, and prints what stayed on the device
next to what a sniffer on the link captured.
"""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from lambdasplit.client.device import DeviceModel
from lambdasplit.client.run import run_generation
from lambdasplit.llm.checkpoint import Checkpoint
from lambdasplit.llm.segments import parse_split
from lambdasplit.server.process import ServerProcess


def _hexdump(data: bytes, width: int = 16, lines: int = 4) -> str:
    rows = []
    for offset in range(0, min(len(data), width * lines), width):
        chunk = data[offset:offset + width]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        rows.append(f"{offset:04x}  {chunk.hex(' '):<{width * 3}} {text}")
    return "\n".join(rows)


def text_in_capture(texts: list[str], capture: list[tuple[str, bytes]], min_chars: int = 4) -> list[str]:
    """Substrings (>= min_chars) of the given texts that appear verbatim in the captured bytes."""
    streams = {d: b"".join(data for direction, data in capture if direction == d) for d in ("up", "down")}
    found = []
    for text in texts:
        words = [w for w in text.split() if len(w) >= min_chars]
        for word in words:
            if any(word.encode() in stream for stream in streams.values()):
                found.append(word)
    return found


def run_demo(args) -> int:
    console = Console()
    console.print("[bold]lambdasplit demo[/]: the head and tail run here, the body in a separate server process\n")
    with console.status("preparing the model (the first run converts the bundled GGUF, about 20 s)"):
        checkpoint = Checkpoint(args.model)
    n = checkpoint.config.num_hidden_layers
    split = args.split or f"{min(2, n // 2)}:{n - min(2, n // 2)}"
    x, y = parse_split(split, n)
    with console.status(f"starting `lambdasplit serve --layers {split}` on loopback"):
        server = ServerProcess(["--model", str(checkpoint.folder), "--layers", split]).start()
    try:
        with console.status("loading head and tail"):
            device = DeviceModel.load(checkpoint, split)
        console.print(f"body server: {server.address} (layers {x}..{y - 1} of {n})")
        console.print(f"[bold]prompt:[/] {args.prompt}\n[bold]answer:[/] ", end="")
        capture: list[tuple[str, bytes]] = []
        record = run_generation(
            model=checkpoint, mode="split", prompt=args.prompt, max_new_tokens=args.max_new_tokens, split=split,
            server=server.address, codec="fp16", device=device, capture=capture,
            on_text=lambda piece: console.print(piece, end="", markup=False, highlight=False),
        )
        console.print("\n")
    finally:
        server.stop()

    local = Table.grid(padding=(0, 1))
    local.add_row("prompt text", args.prompt)
    local.add_row("generated text", record["text"])
    local.add_row("tokenizer, embedding", "here")
    local.add_row("layers", f"0..{x - 1} (head) and {y}..{n - 1} (tail), final norm, LM head, sampling")

    up = [data for direction, data in capture if direction == "up"]
    leaked = text_in_capture([args.prompt, record["text"]], capture)
    wire = Table.grid(padding=(0, 1))
    wire.add_row("bytes up / down", f"{record['bytes_up']:,} / {record['bytes_down']:,} (fp16 hidden states, framing included)")
    wire.add_row("round trips", f"{record['round_trips']} (one per generated token; the prompt is the first)")
    wire.add_row("per token", f"one vector of {checkpoint.config.hidden_size} fp16 values each way")
    wire.add_row("prompt/answer words in the capture", ", ".join(leaked) if leaked else "none found")
    console.print(Panel(local, title="stayed on this device", border_style="green"))
    console.print(Panel(wire, title="crossed the wire (what an eavesdropper captures)", border_style="red"))
    if len(up) > 2:
        console.print(Panel(_hexdump(up[2]), title="the first token's uplink frame, as sniffed", expand=False))
    console.print(
        "[dim]Not seeing the text in the bytes is not privacy: anyone with the public weights can invert shallow "
        "hidden states. See docs/privacy.md for what the audit measures.[/]"
    )
    return 0
