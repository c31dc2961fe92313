"""`lambdasplit audit llm` and `lambdasplit audit diffusion`."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from lambdasplit.zoo.registry import DEFAULT_DIFFUSION, DEFAULT_LLM


def add_commands(subparsers) -> None:
    audit = subparsers.add_parser("audit", help="privacy audit: what an eavesdropper or the cloud recovers")
    sub = audit.add_subparsers(dest="audit_command", required=True, metavar="TARGET")

    p = sub.add_parser("llm", help="attack captured split-LLM sessions at several split depths (takes minutes)",
                       description="Run real split sessions of the shipped test prompts over a loopback server, "
                                   "capture every byte, and attack the capture as an eavesdropper, as the cloud "
                                   "with the public weights, and with inverters trained on public text; report "
                                   "the share of prompt and output tokens each recovers. Takes minutes: about "
                                   "9 minutes for zoo:smollm2 at the defaults on a 2-core CPU (docs/privacy.md).")
    p.add_argument("--model", default=DEFAULT_LLM)
    p.add_argument("--splits", default="1,2,4,8", help="head depths X, each with tail depth X (Y = N - X)")
    p.add_argument("--split", metavar="X:Y", help="audit one split instead (needs Y = N - X)")
    p.add_argument("--codec", default="fp16")
    p.add_argument("--defense", action="append", default=None,
                   help="none | gaussian:sigma=S,clip=C | dpquant:bits=B,epsilon=E,clip=C (clip=auto and, for "
                        "gaussian, nsr=R are calibrated on public text); repeat for a curve; 'default' = a standard sweep")
    p.add_argument("--defense-split", type=int, help="head depth X at which defenses are audited (default: smallest)")
    p.add_argument("--prompts", type=int, default=8, help="how many of the shipped test prompts (max 12)")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--train-tokens", type=int, default=8000, help="public text tokens for the learned inverters")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--sweep-budget", type=float, default=40.0, help="seconds per split for full-vocabulary sweeps")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--out", type=Path, help="write DIR/report.md, DIR/report.json and DIR/*.png")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.set_defaults(func=llm_command)

    d = sub.add_parser("diffusion", help="replay, preview and prompt-recovery attacks on a split diffusion session",
                       description="Capture split diffusion sessions and attack them: replay the schedule to "
                                   "rebuild the image, decode previews, match the prompt. Takes minutes "
                                   "(docs/privacy.md).")
    d.add_argument("--model", default=DEFAULT_DIFFUSION,
                   help="pipeline folder, zoo:NAME, or tiny:sd (a tiny random SD pipeline with a CLIP encoder, built "
                        "on the fly: exercises the attacks where no trained model is at hand)")
    d.add_argument("--protocol", choices=["cloud-latent", "client-latent", "both", "ppidm"], default="both")
    d.add_argument("--servers", type=int, default=4, help="ppidm: number of shard servers n (default %(default)s)")
    d.add_argument("--ppidm-mode", choices=["exact", "paper"], default="exact", help="ppidm: group-norm mode")
    d.add_argument("--train-images", type=int, default=80,
                   help="ppidm: the attacker's own generations for the learned K inverter (default %(default)s)")
    d.add_argument("--cnn-seconds", type=float, default=120.0,
                   help="ppidm: wall-time budget for training the CNN K/V inverter (default %(default)s)")
    d.add_argument("--local-steps", default="0,2,5,10", help="defense sweep: last K denoising steps kept on the device")
    d.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's, 25 for zoo:digits)")
    d.add_argument("--prompts", type=int, default=10, help="sessions (one prompt per digit)")
    d.add_argument("--codec", default="fp16")
    d.add_argument("--candidates", type=Path, metavar="FILE",
                   help="prompt-matching candidates, one prompt per line (default: zoo:digits' whole public prompt "
                        "set; for other models the audited prompts themselves, a closed-world best case)")
    d.add_argument("--threads", type=int, default=0)
    d.add_argument("--out", type=Path)
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=diffusion_command)


def _threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


def llm_command(args) -> int:
    from lambdasplit.audit.llm import DEFAULT_DEFENSES, LLMAuditConfig, audit_llm, default_prompts
    from lambdasplit.audit.report import print_table, write_report
    from lambdasplit.errors import LambdaSplitError
    from lambdasplit.llm.checkpoint import Checkpoint

    _threads(args.threads)
    if args.split:
        n = Checkpoint(args.model).config.num_hidden_layers
        x, _, y = args.split.partition(":")
        if not (x.isdigit() and y.isdigit()) or int(x) + int(y) != n:
            raise LambdaSplitError(f"--split must be X:Y with Y = N - X = {n} - X (the tail as deep as the head)")
        splits = [int(x)]
    else:
        try:
            splits = [int(v) for v in args.splits.split(",") if v]
        except ValueError:
            raise LambdaSplitError(f"--splits must be comma-separated integers, got {args.splits!r}") from None
    defenses = []
    for spec in args.defense or []:
        defenses += DEFAULT_DEFENSES if spec == "default" else [spec]
    prompts = default_prompts()[: max(1, args.prompts)]
    config = LLMAuditConfig(model=args.model, splits=splits, codec=args.codec, prompts=prompts,
                            max_new_tokens=args.max_new_tokens, defenses=defenses, defense_split=args.defense_split,
                            train_tokens=args.train_tokens, epochs=args.epochs, sweep_budget_s=args.sweep_budget)
    try:
        report = audit_llm(config, progress=not args.json)
    except ValueError as error:
        raise LambdaSplitError(str(error)) from None
    command = "lambdasplit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.out:
        for path in write_report(report, args.out, command):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print_table(report)
    return 0


def _lines(path: Path) -> list[str]:
    """Non-empty lines of a text file."""
    from lambdasplit.errors import LambdaSplitError

    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except OSError as error:
        raise LambdaSplitError(f"cannot read --candidates {path}: {error}") from None
    if not lines:
        raise LambdaSplitError(f"--candidates {path} has no prompts")
    return lines


def diffusion_command(args) -> int:
    from lambdasplit.audit.diffusion import DiffusionAuditConfig, audit_diffusion, print_diffusion, write_diffusion

    _threads(args.threads)
    if args.protocol == "ppidm":  # n shard servers: its own attacks (diffusion/ppidm/audit.py)
        from lambdasplit.diffusion.ppidm import audit as ppidm_audit

        return ppidm_audit.command(args)
    model = args.model
    if model == "tiny:sd":
        import tempfile

        from lambdasplit.diffusion.tiny import build_tiny_pipeline

        model = str(build_tiny_pipeline(Path(tempfile.mkdtemp(prefix="lambdasplit-tiny-sd-"))))
    config = DiffusionAuditConfig(model=model, protocol=args.protocol, steps=args.steps, sessions=args.prompts,
                                  local_steps=[int(v) for v in args.local_steps.split(",") if v], codec=args.codec,
                                  candidates=_lines(args.candidates) if args.candidates else None)
    report = audit_diffusion(config, progress=not args.json)
    command = "lambdasplit " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    if args.out:
        for path in write_diffusion(report, args.out, command):
            print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print_diffusion(report)
    return 0
