"""`lambdasplit calibrate`: compute (or show the cached) calibration tables of the `calK` codec for a model and split."""

from __future__ import annotations

import json


def add_commands(subparsers) -> None:
    from lambdasplit.zoo.registry import DEFAULT_LLM

    c = subparsers.add_parser("calibrate", help="calibration tables of the cal codec for one model and split",
                              description="Measures, on text disjoint from the benchmark prompts, the basis, steps "
                                          "and Rice parameters of the calK codec for both directions of a split, and "
                                          "caches them under $LAMBDASPLIT_CACHE/calibration (wire/calibrate.py).")
    c.add_argument("--model", default=DEFAULT_LLM, help="Hub id, folder or zoo:NAME (default %(default)s)")
    c.add_argument("--split", required=True, help="X:Y (N = layer count)")
    c.add_argument("--json", action="store_true", help="print a JSON summary")
    c.set_defaults(func=calibrate_command)


def calibrate_command(args) -> int:
    from lambdasplit.bench.codecs import _workload, resolve_model
    from lambdasplit.wire.calibrate import cache_path, load_or_calibrate

    model = resolve_model(args.model)
    device, body = _workload(model, args.split)
    up, down = load_or_calibrate(device, body, progress=not args.json)
    path = cache_path(device.checkpoint.fingerprint, device.split)
    summary = {"model": args.model, "split": f"{device.split[0]}:{device.split[1]}", "hidden_size": up.width,
               "table_bytes": len(up.to_bytes()), "cache": str(path),
               "up_digest": up.digest.hex(), "down_digest": down.digest.hex()}
    for name, table in (("up", up), ("down", down)):
        # weight_i = sqrt(geomean(F) / F_i): mean(weight^-2) is the Fisher information's arithmetic over geometric
        # mean in the calibrated basis, 2^(log2 of it / 2) what a sensitivity weighting can gain per value
        summary[f"{name}_fisher_am_over_gm"] = float((table.weight.astype("float64") ** -2).mean())
        summary[f"{name}_weight_range"] = [float(table.weight.min()), float(table.weight.max())]
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"calibration of {args.model} at {summary['split']}: D = {up.width}, {summary['table_bytes']} bytes per "
              f"direction, up {summary['up_digest']}, down {summary['down_digest']}, cached in {path}")
        for name in ("up", "down"):
            low, high = summary[f"{name}_weight_range"]
            print(f"  {name}: Fisher information arithmetic / geometric mean {summary[f'{name}_fisher_am_over_gm']:.3f} "
                  f"over the components, relative steps {low:.3f}..{high:.3f}")
    return 0
