"""`lambdasplit bench diffusion`: the Λ-Split paper's quantization study, measured.

For each codec of the predicted noise, over a set of prompts with one seed: traffic per
image as counted on the socket (up, down, total) and the noise payload per step, wall
time per image, and image quality against the FP32 image of the same prompt and seed:
PSNR and SSIM (diffusion/quality.py, scikit-image, on the 8-bit pixels), and, for the
bundled digits model, the fraction of images an independent digit classifier still
labels as the prompt asks. Then it names the cheapest codec that keeps PSNR >= 35 dB.

With --modes it instead times one prompt in each mode (local, split over both protocols,
int8 noise, --local-steps, cloud-only), median of --repeat runs, against a real
`serve --component unet` and `serve --component pipeline` process: the mode table of
docs/diffusion.md.

PSNR over a set is pooled: 10 log10(255^2 / mean MSE over the images), so bit-identical
images (MSE 0, PSNR infinite) count without making the average infinite; the worst
single image is reported next to it. Images go through a real `lambdasplit serve`
process on loopback unless --server names one.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from pathlib import Path

import numpy as np

# The paper's set (FP16, INT8, INT6, INT4, INT2), plus bf16, the odd widths and per-channel
# scales, so the search for the cheapest codec above the quality bar is not limited to it.
DEFAULT_CODECS = "fp32,fp16,bf16,int8,int6,int5,int4,int3,int2,int8/channel,int4/channel,int3/channel,int2/channel"
GENERIC_PROMPTS = ["a red cat", "a lighthouse", "a bowl of fruit", "a blue lake"]


def add_arguments(parser) -> None:
    from lambdasplit.client.commands import add_session_options
    from lambdasplit.zoo.registry import DEFAULT_DIFFUSION

    parser.add_argument("--model", default=DEFAULT_DIFFUSION, help="diffusers pipeline folder or zoo:NAME (default %(default)s)")
    parser.add_argument("--codecs", default=DEFAULT_CODECS, help="comma-separated noise codecs (default %(default)s)")
    parser.add_argument("--prompt", action="append", dest="prompts",
                        help="a prompt (repeat); default: the ten digits for zoo:digits, a few generic prompts otherwise")
    parser.add_argument("--steps", type=int, help="denoising steps (default 25)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default 4)")
    parser.add_argument("--seed", type=int, default=42, help="one seed for every image (default %(default)s, as the paper)")
    parser.add_argument("--protocol", choices=["cloud-latent", "client-latent"], default="cloud-latent")
    parser.add_argument("--server", metavar="HOST:PORT", help="a running `serve --component unet` (default: start one on loopback)")
    parser.add_argument("--min-psnr", type=float, default=35.0, help="quality bar for the cheapest codec (default %(default)s dB)")
    parser.add_argument("--out", metavar="DIR", help="write table.md, table.csv, table.json, run.json and grid.png")
    parser.add_argument("--judge", choices=["auto", "digits", "none"], default="auto",
                        help="digits: label every image with the independent digit classifier (auto: for zoo:digits)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on each side (default %(default)s: device and server share a small machine)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout instead of the table")
    parser.add_argument("--modes", action="store_true",
                        help="instead of the codec study: time and traffic of the first prompt in every mode")
    parser.add_argument("--repeat", type=int, default=3, help="--modes: runs per mode, the median is kept (default %(default)s)")
    add_session_options(parser)


def expected_digit(prompt: str) -> int | None:
    """The digit a prompt asks for ('... seven' or '... 7'), or None."""
    from lambdasplit.zoo.digits_data import WORDS

    words = prompt.lower().replace(",", " ").split()
    for digit, word in enumerate(WORDS):
        if word in words or str(digit) in words:
            return digit
    return None


def _pooled_psnr(mses: list[float]) -> float:
    mse = float(np.mean(mses))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


def run_study(device, server: str, prompts: list[str], codecs: list[str], *, steps: int, guidance: float, seed: int,
              protocol: str = "cloud-latent", judge: bool = False, session_options: dict | None = None,
              progress=None) -> dict:
    """Generate every (codec, prompt) image; return rows (one per codec) and the images."""
    from lambdasplit.diffusion.client import imagine
    from lambdasplit.diffusion.quality import psnr, ssim, to_uint8

    session_options = session_options or {}
    digits = [expected_digit(p) for p in prompts]
    judge_model = None
    if judge:
        from lambdasplit.errors import LambdaSplitError
        from lambdasplit.zoo.digit_classifier import classifier

        if any(d is None for d in digits):
            raise LambdaSplitError("--judge digits needs every prompt to name a digit ('... seven' or '... 7')")
        judge_model = classifier()
    if "fp32" not in codecs:
        codecs = ["fp32", *codecs]  # the reference
    images: dict[str, list[np.ndarray]] = {}
    rows = []
    for codec in codecs:
        records, pictures = [], []
        for prompt in prompts:
            result = imagine(device, prompt, server=server, protocol=protocol, steps=steps, seed=seed,
                             guidance=guidance, codec=codec, **session_options)
            records.append(result.record)
            pictures.append(result.image)
            if progress:
                progress()
        images[codec] = pictures
        reference = images["fp32"]
        mses = [float(np.mean((to_uint8(a).astype(np.float64) - to_uint8(b).astype(np.float64)) ** 2))
                for a, b in zip(reference, pictures)]
        per_image_psnr = [psnr(a, b) for a, b in zip(reference, pictures)]
        mean = lambda key: float(np.mean([r[key] for r in records]))  # noqa: E731
        row = {
            "codec": records[0]["codec"],
            "noise_bytes_per_step": records[0]["noise_payload_bytes_per_step"],
            "up_bytes": mean("bytes_up"), "down_bytes": mean("bytes_down"),
            "total_bytes": mean("bytes_up") + mean("bytes_down"),
            "seconds": mean("seconds"), "cloud_seconds": mean("cloud_seconds"),
            "psnr_db": _pooled_psnr(mses), "min_psnr_db": min(per_image_psnr),
            "ssim": float(np.mean([ssim(a, b) for a, b in zip(reference, pictures)])),
            "identical": sum(m == 0 for m in mses),
            "images": len(prompts),
        }
        if judge_model is not None:
            labels = judge_model.predict(np.stack(pictures))
            row["prompt_match"] = float(np.mean(labels == np.array(digits)))
        rows.append(row)
    base = rows[0]["noise_bytes_per_step"]
    for row in rows:
        row["noise_vs_fp32"] = row["noise_bytes_per_step"] / base
    return {"rows": rows, "images": images, "prompts": prompts}


def cheapest(rows: list[dict], min_psnr: float, key: str = "psnr_db") -> dict | None:
    """The codec with the fewest bytes per image whose PSNR against FP32 (pooled, or `min_psnr_db`:
    the worst image) is >= min_psnr."""
    passing = [r for r in rows if r[key] >= min_psnr]
    return min(passing, key=lambda r: (r["total_bytes"], r["noise_bytes_per_step"])) if passing else None


def columns(with_match: bool):
    from lambdasplit.bench.report import Column

    def db(v):
        return "identical" if v in ("inf", float("inf")) else f"{v:.1f}"

    cols = [
        Column("codec", "codec", numeric=False),
        Column("noise_bytes_per_step", "noise B/step", "d"),
        Column("noise_vs_fp32", "vs FP32", lambda v: f"{v:.2%}"),
        Column("up_bytes", "up B/image", ".0f"),
        Column("down_bytes", "down B/image", ".0f"),
        Column("total_bytes", "total B/image", ".0f"),
        Column("seconds", "s/image", ".2f"),
        Column("psnr_db", "PSNR dB", db),
        Column("min_psnr_db", "worst PSNR dB", db),
        Column("ssim", "SSIM", ".3f"),
    ]
    if with_match:
        cols.append(Column("prompt_match", "prompt match", lambda v: f"{v:.0%}"))
    return cols


def write_grid(path: Path, study: dict, max_prompts: int = 10) -> None:
    """One row per codec, one column per prompt; the row label carries the codec and PSNR."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, prompts = study["rows"], study["prompts"][:max_prompts]
    fig, axes = plt.subplots(len(rows), len(prompts), figsize=(1.3 * len(prompts) + 1.6, 1.3 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c, prompt in enumerate(prompts):
            ax = axes[r][c]
            image = study["images"][row["codec"]][c]
            ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(prompt if len(prompt) <= 18 else "…" + " ".join(prompt.split()[-2:]), fontsize=6)
        psnr = "ref" if row["codec"] == "fp32" else ("=" if row["psnr_db"] == float("inf") else f"{row['psnr_db']:.0f} dB")
        axes[r][0].set_ylabel(f"{row['codec']}\n{psnr}", fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _jsonable(value):
    return "inf" if isinstance(value, float) and math.isinf(value) else value  # JSON has no Infinity


def run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from lambdasplit.bench.report import print_table, write_outputs
    from lambdasplit.diffusion.client import default_settings
    from lambdasplit.diffusion.commands import quiet_loaders
    from lambdasplit.diffusion.protocols import diffusion_codec
    from lambdasplit.diffusion.split import Device
    from lambdasplit.server.process import ServerProcess

    import torch

    quiet_loaders()
    torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    default_steps, default_guidance = default_settings()
    steps = args.steps or default_steps
    guidance = default_guidance if args.guidance is None else args.guidance
    codecs = [diffusion_codec(c.strip()).name for c in args.codecs.split(",") if c.strip()]
    device = Device.load(args.model, with_unet=args.modes)  # --modes runs local steps too
    is_digits = args.model == "zoo:digits" or device.info.folder.name == "digits"
    judge = args.judge == "digits" or (args.judge == "auto" and is_digits)
    if args.prompts:
        prompts = args.prompts
    elif is_digits:
        from lambdasplit.zoo.digits_data import prompt

        prompts = [prompt(d) for d in range(10)]
    else:
        prompts = GENERIC_PROMPTS
    options = dict(token=args.token, tls_ca=args.tls_ca, link=args.link)
    if args.modes:
        prompt = args.prompts[0] if args.prompts else (prompts[7] if is_digits else prompts[0])  # digits: "... seven"
        return run_modes(args, device, prompt, steps=steps, guidance=guidance, session_options=options, console=console)
    began = time.perf_counter()
    server = None
    if not args.server:
        console.print("starting a loopback `lambdasplit serve --component unet` ...")
        server = ServerProcess(["--component", "unet", "--model", str(device.info.folder), "--port", "0"],
                               env={"OMP_NUM_THREADS": str(args.threads)}).start()
    try:
        total = len(prompts) * (len(codecs) + ("fp32" not in codecs))
        with Progress(TextColumn("[bold]images"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True, disable=args.json) as progress:
            task = progress.add_task("images", total=total)
            study = run_study(device, args.server or server.address, prompts, codecs, steps=steps, guidance=guidance,
                              seed=args.seed, protocol=args.protocol, judge=judge, session_options=options,
                              progress=lambda: progress.advance(task))
    finally:
        if server is not None:
            server.stop()
    rows = study["rows"]
    best = cheapest(rows, args.min_psnr)
    best_worst = cheapest(rows, args.min_psnr, "min_psnr_db")
    with_match = "prompt_match" in rows[0]
    command = "lambdasplit bench diffusion " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    verdict = (f"cheapest codec with PSNR >= {args.min_psnr:g} dB against FP32: {best['codec']} "
               f"({best['total_bytes']:.0f} B/image, {best['noise_vs_fp32']:.2%} of FP32's noise payload)"
               if best else f"no codec reaches PSNR >= {args.min_psnr:g} dB")
    verdict += (f"; with every single image >= {args.min_psnr:g} dB: {best_worst['codec']} "
                f"({best_worst['total_bytes']:.0f} B/image)" if best_worst else "")
    notes = [
        f"model {args.model}, {len(prompts)} prompts, {steps} steps, guidance {guidance:g}, seed {args.seed}, "
        f"protocol {args.protocol}, {args.threads} torch thread(s) per side; machine: {_machine_line()}",
        "PSNR pooled over the prompts (10 log10(255^2 / mean MSE)), SSIM averaged; both against the FP32 image "
        "of the same prompt and seed, on 8-bit pixels (scikit-image)",
        verdict,
        f"command: {command}",
    ]
    meta = {"command": command, "model": args.model, "prompts": prompts, "steps": steps, "guidance": guidance,
            "seed": args.seed, "protocol": args.protocol, "threads": args.threads, "cheapest_codec": best["codec"] if best else None,
            "cheapest_codec_every_image": best_worst["codec"] if best_worst else None,
            "min_psnr": args.min_psnr, "seconds": time.perf_counter() - began}
    clean = [{k: _jsonable(v) for k, v in row.items()} for row in rows]
    if args.out:
        out = write_outputs(args.out, clean, columns(with_match), title="Λ-Split diffusion: noise quantization",
                            meta=meta, notes=notes)
        write_grid(out / "grid.png", study)
    if args.json:
        print(json.dumps({"rows": clean, **meta}))
    else:
        print_table(rows, columns(with_match), title="Λ-Split diffusion: noise quantization", caption=notes[0])
        console.print(verdict, markup=False)
        if args.out:
            console.print(f"wrote {args.out}/table.md, table.csv, table.json, run.json, grid.png", markup=False)
    return 0


def mode_rows(steps: int) -> list[tuple[str, dict]]:
    """(label, imagine options) of each row of the mode table."""
    rows = [
        ("local (--mode local)", {"mode": "local"}),
        ("split cloud-latent", {}),
        ("split cloud-latent, int8 (--codec int8)", {"codec": "int8"}),
        ("split client-latent (--protocol client-latent)", {"protocol": "client-latent"}),
    ]
    local = min(5, steps - 1)
    if local > 0:
        rows.append((f"split, last {local} steps local (--local-steps {local})", {"local_steps": local}))
    return rows + [("cloud (--mode cloud)", {"mode": "cloud"})]


def run_modes(args, device, prompt: str, *, steps: int, guidance: float, session_options: dict, console) -> int:
    """`bench diffusion --modes`: one prompt in every mode, median time of --repeat runs, bytes, same-image check."""
    import statistics

    from lambdasplit.bench.report import Column, print_table, write_outputs
    from lambdasplit.diffusion.client import imagine
    from lambdasplit.errors import LambdaSplitError
    from lambdasplit.server.process import ServerProcess

    if args.server:
        raise LambdaSplitError("--modes starts its own `serve --component unet` and `--component pipeline`: drop --server")
    env = {"OMP_NUM_THREADS": str(args.threads)}
    folder = str(device.info.folder)
    rows = []
    began = time.perf_counter()
    console.print("starting loopback `lambdasplit serve --component unet` and `--component pipeline` ...")
    with ServerProcess(["--component", "unet", "--model", folder], env=env) as unet, \
            ServerProcess(["--component", "pipeline", "--model", folder], env=env) as pipeline:
        reference = None  # the image of the first row, local mode
        for label, options in mode_rows(steps):
            server = pipeline.address if options.get("mode") == "cloud" else unet.address
            runs = [imagine(device, prompt, server=server, steps=steps, seed=args.seed, guidance=guidance,
                            **options, **session_options) for _ in range(max(1, args.repeat))]
            reference = runs[0].image if reference is None else reference
            median = lambda key: statistics.median(r.record[key] for r in runs)  # noqa: E731
            last = runs[-1].record
            rows.append({"mode": label, "seconds": median("seconds"), "local_seconds": median("local_seconds"),
                         "cloud_seconds": median("cloud_seconds"), "comm_seconds": median("comm_seconds"),
                         "bytes_up": last["bytes_up"], "bytes_down": last["bytes_down"],
                         "round_trips": last["round_trips"],
                         "same_image_as_local": all(np.array_equal(r.image, reference) for r in runs)})
    cols = [Column("mode", "mode (options)", numeric=False), Column("seconds", "s/image", ".2f"),
            Column("local_seconds", "device s", ".2f"), Column("cloud_seconds", "cloud s", ".2f"),
            Column("comm_seconds", "comm s", ".2f"), Column("bytes_up", "up B", "d"), Column("bytes_down", "down B", "d"),
            Column("round_trips", "round trips", "d"),
            Column("same_image_as_local", "same image as local", lambda v: "yes" if v else "no", numeric=False)]
    command = "lambdasplit bench diffusion " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    caption = (f"model {args.model}, prompt {prompt!r}, {steps} steps, guidance {guidance:g}, seed {args.seed}, "
               f"median of {args.repeat} runs, {args.threads} torch thread(s) per side, loopback; machine: {_machine_line()}")
    meta = {"command": command, "model": args.model, "prompt": prompt, "steps": steps, "guidance": guidance,
            "seed": args.seed, "repeat": args.repeat, "threads": args.threads, "seconds": time.perf_counter() - began}
    title = "Λ-Split diffusion: time and traffic per image, by mode"
    if args.out:
        write_outputs(args.out, rows, cols, title=title, meta=meta, notes=[caption, f"command: {command}"])
    if args.json:
        print(json.dumps({"rows": rows, **meta}))
    else:
        print_table(rows, cols, title=title, caption=caption)
    return 0


def _machine_line() -> str:
    from lambdasplit.bench.report import machine

    m = machine()
    return f"{m['cpu_count']}-core CPU ({m['processor']}), {'GPU' if m['gpu'] else 'no GPU'}, torch {m['torch']}"
