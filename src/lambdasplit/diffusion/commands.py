"""`lambdasplit imagine`: text to image in split, local or cloud mode."""

from __future__ import annotations

import json
import sys

from lambdasplit.client.commands import add_session_options, plural
from lambdasplit.zoo.registry import DEFAULT_DIFFUSION


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("imagine", help="text to image with a split diffusion pipeline (split, local or cloud)")
    p.add_argument("--model", default=DEFAULT_DIFFUSION, help="diffusers pipeline folder or zoo:NAME (default %(default)s)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt")
    p.add_argument("--mode", choices=["split", "local", "cloud"], default="split")
    p.add_argument("--server", metavar="HOST:PORT", help="`serve --component unet` (split) or `--component pipeline` (cloud)")
    p.add_argument("--protocol", choices=["cloud-latent", "client-latent", "ppidm", "shared"], default="cloud-latent",
                   help="cloud-latent: the cloud keeps a copy of the latent and streams the noise (paper); "
                        "client-latent: x_t goes up every step, the cloud never runs the scheduler; "
                        "ppidm: the U-Net's conv / group-norm / attention layers cut across --servers; "
                        "shared: the U-Net's convolutions and linear layers on additive secret shares over "
                        "--servers A,B (`serve --component shares`)")
    p.add_argument("--servers", metavar="A,B,...", help="ppidm: the `serve --component unet-shard` servers (n >= 2); "
                   "shared: the share-0 and share-1 servers")
    p.add_argument("--ppidm-mode", choices=["exact", "paper"], default="exact",
                   help="ppidm: exact (global group-norm statistics; equals the unsplit pipeline) or paper "
                        "(each block normalized with its own statistics, as the PPIDM paper)")
    p.add_argument("--ppidm-small-maps", choices=["refuse", "local"], default="refuse",
                   help="ppidm: a layer whose map is too small to cut among the servers is refused, or run on the device")
    p.add_argument("--ppidm-batching", choices=["on", "off"], default="on",
                   help="ppidm: carry several layers per round trip where the data flow allows (docs/diffusion.md)")
    p.add_argument("--steps", type=int, help="denoising steps (default: 25, the digits model's setting)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; <= 1 disables it (default 4)")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="image size (default: the model's)")
    p.add_argument("--scheduler", help="replace the model's scheduler, e.g. EulerDiscreteScheduler")
    p.add_argument("--codec", default="fp32",
                   help="codec of the predicted noise (downlink): fp32, fp16, bf16, intN (N=2..8, per tensor) or intN/channel")
    p.add_argument("--up-codec", default="fp32", help="codec of the uplink tensors (embeddings, latents); default fp32")
    p.add_argument("--local-steps", type=int, default=0, metavar="K",
                   help="privacy: run the last K denoising steps on the device (loads the U-Net here too)")
    p.add_argument("--verify-sync", action="store_true",
                   help="cloud-latent: the cloud sends a digest of its latent each step; stop if the copies differ")
    p.add_argument("--show-wire", type=int, metavar="STEP",
                   help="also save the predicted noise of STEP as received after the codec (OUT stem + .wire-STEP.png)")
    p.add_argument("--out", default="image.png", help="output PNG (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object and nothing else on stdout")
    add_session_options(p)
    p.set_defaults(func=imagine_command)


def wire_picture(noise, scale: int = 8):
    """The noise of one step as a picture: its channels side by side, grey, min..max of the tensor
    (so quantization levels show), nearest-neighbour upscaled. Shape [1, C, h, w] -> PIL."""
    import numpy as np
    from PIL import Image

    x = noise[0].float().numpy()
    low, high = float(x.min()), float(x.max())
    x = (x - low) / (high - low or 1.0)
    tiles = np.concatenate(list(x), axis=1)  # [h, C*w]
    pixels = (tiles * 255).round().astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    return Image.fromarray(pixels, mode="L")


def quiet_loaders() -> None:
    """Our own progress bar replaces diffusers' and transformers' per-component loading bars."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()  # e.g. "expected CLIPTextModel, got BertModel" for zoo:digits
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # e.g. prompt truncation notes: the model's limit, not ours


def imagine_command(args) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lambdasplit.diffusion.client import imagine

    console = Console(stderr=True)
    quiet_loaders()
    if args.local_steps and not args.json:
        console.print(f"[yellow]--local-steps {args.local_steps}: the device loads the U-Net too and runs the last "
                      f"{args.local_steps} denoising steps itself[/yellow]")
    keep = (args.show_wire,) if args.show_wire is not None else ()
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, disable=args.json or args.mode == "cloud", transient=True)
    with progress:
        task = progress.add_task(f"{args.mode} denoising", total=None)
        make_image = imagine
        if args.protocol == "ppidm":  # the same call, answered by n unet-shard servers
            from lambdasplit.diffusion.ppidm.run import imagine_for_command

            make_image = imagine_for_command(args)
        if args.protocol == "shared":  # the U-Net's linear layers on secret shares over two servers
            from lambdasplit.shares.unet import imagine_for_command as shared_for_command

            make_image = shared_for_command(args)
        result = make_image(
            args.model, args.prompt, mode=args.mode, server=args.server, protocol=args.protocol, steps=args.steps,
            seed=args.seed, guidance=args.guidance, negative_prompt=args.negative_prompt, size=args.size,
            codec=args.codec, up_codec=args.up_codec, local_steps=args.local_steps, scheduler=args.scheduler,
            verify=args.verify_sync, keep_wire=keep, token=args.token, tls_ca=args.tls_ca, link=args.link,
            on_step=lambda i, n: progress.update(task, completed=i + 1, total=n))
    out = Path(args.out)
    result.pil.save(out)
    record = {**result.record, "out": str(out)}
    if args.show_wire is not None:
        if args.show_wire not in result.wire:
            from lambdasplit.errors import LambdaSplitError

            raise LambdaSplitError(f"--show-wire {args.show_wire}: no noise crossed the wire at that step "
                                   f"(cloud steps: 0..{record.get('cloud_steps', 0) - 1})")
        wire_path = out.with_name(f"{out.stem}.wire-{args.show_wire}.png")
        wire_picture(result.wire[args.show_wire]).save(wire_path)
        record["wire_picture"] = str(wire_path)
    if args.json:
        print(json.dumps(record))
    else:
        console.print(f"wrote {out} ({record['mode']}"
                      f"{' ' + record['protocol'] + ' ' + record['codec'] if record['protocol'] else ''}: "
                      f"{record['seconds']:.2f} s, {record['bytes_up']} B up, {record['bytes_down']} B down, "
                      f"{plural(record['round_trips'], 'round trip')})", markup=False, soft_wrap=True)
        if "wire_picture" in record:
            console.print(f"wrote {record['wire_picture']} (step {args.show_wire} noise as received)", soft_wrap=True)
    sys.stdout.flush()
    return 0
