"""Writers shared by every benchmark: a rich table in the terminal, and table.md / table.csv /
table.json / run.json in an output folder.

A benchmark describes its table once, as a list of `Column`s over row dicts; every
writer uses that one description, so the terminal, the Markdown and the CSV never
disagree. JSON and CSV keep the raw values (bytes, seconds); the terminal and Markdown
show them formatted (MB, seconds with 2 decimals).
"""

from __future__ import annotations

import csv
import json
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Column:
    """One column: the row key, its header, and how to show a value (a format spec or a function)."""

    key: str
    header: str
    fmt: str | Callable[[Any], str] = ""
    numeric: bool = True

    def show(self, row: dict) -> str:
        value = row.get(self.key)
        if value is None or value == "":
            return ""
        if callable(self.fmt):
            return self.fmt(value)
        return format(value, self.fmt)


def megabytes(nbytes: float) -> str:
    """Bytes as MB (10^6 bytes, as the Λ-Split paper's Table I counts)."""
    return f"{nbytes / 1e6:.2f}"


def print_table(rows: list[dict], columns: list[Column], title: str = "", caption: str = "",
                console: Console | None = None) -> None:
    table = Table(title=title or None, caption=caption or None)
    for column in columns:
        table.add_column(column.header, justify="right" if column.numeric else "left")
    for row in rows:
        table.add_row(*(column.show(row) for column in columns))
    if console is None:
        console = Console()
        if not console.is_terminal:  # piped or logged: do not squeeze the table into 80 columns
            console = Console(width=max(console.width, 200))
    console.print(table)


def markdown_table(rows: list[dict], columns: list[Column]) -> str:
    lines = ["| " + " | ".join(c.header for c in columns) + " |",
             "|" + "|".join("---:" if c.numeric else ":---" for c in columns) + "|"]
    lines += ["| " + " | ".join(c.show(row) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine() -> dict:
    """What the numbers were measured on (figures in docs must name the machine).

    torch_threads is this process's intra-op thread count at the time of the call (the
    benchmarks set it from --threads before measuring); load_average is os.getloadavg()
    then (other jobs on the machine slow every timing).
    """
    import torch

    return {
        "cpu_count": os.cpu_count(), "platform": platform.platform(), "processor": _cpu_model(),
        "python": sys.version.split()[0], "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.is_available(), "load_average": _load_average(),
    }


def describe_machine(info: dict) -> str:
    """One line naming the machine, for terminal and Markdown output."""
    load = info.get("load_average")
    return (f"machine: {info['processor']}, {info['cpu_count']} cores, torch {info['torch']}, "
            f"{info['torch_threads']} torch thread(s) per process, GPU {'yes' if info['gpu'] else 'no'}"
            + (f", load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)" if load else ""))


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:  # not available on every platform
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_outputs(out_dir: str | Path, rows: list[dict], columns: list[Column], *, title: str, meta: dict,
                  notes: list[str] = ()) -> Path:
    """Write table.md, table.csv, table.json (a list, one object per row) and run.json (meta)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", ""]
    md += [f"- {note}" for note in notes]
    md += ["", markdown_table(rows, columns)]
    (out / "table.md").write_text("\n".join(md))
    keys = list(dict.fromkeys(key for row in rows for key in row))
    with open(out / "table.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()})
    (out / "table.json").write_text(json.dumps(rows, indent=1) + "\n")
    run = {"title": title, **meta}
    run.setdefault("machine", machine())  # a benchmark may have taken it during its run
    (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    return out


def report(rows: list[dict], columns: list[Column], *, title: str, meta: dict, notes: list[str], caption: str,
           json_mode: bool, out_dir: str | Path | None, chart: Callable | None = None,
           extra: dict | None = None) -> Path | None:
    """What every bench sub-command does with its rows: the table (or one JSON line), then with --out the files.

    `extra` adds keys to the JSON line; `chart(path, rows, title)` draws out/chart.png. Returns the
    output folder (None without --out) so a command can add files of its own.
    """
    if json_mode:
        print(json.dumps({"rows": rows, "meta": meta, **(extra or {})}))
    else:
        print_table(rows, columns, title=title, caption=caption)
    if not out_dir:
        return None
    out = write_outputs(out_dir, rows, columns, title=title, meta=meta, notes=notes)
    written = "table.md, table.csv, table.json, run.json"
    if chart is not None:
        chart(out / "chart.png", rows, title)
        written += ", chart.png"
    if not json_mode:
        print(f"wrote {out}/{written}")
    return out
