"""A real body-server process hosting the bodies of many models at once, for the exactness matrix
(tests/test_families.py).

`lambdasplit serve` hosts one model per process; the matrix needs ~40 models in three dtypes,
and one process per model would cost more than the matrix itself. This runs the same BodyServer
and BodyServices that `serve` runs, in its own process behind a loopback socket, and prints
`listening on HOST:PORT` as `serve` does, so `ServerProcess` can drive it.

    python tests/family_server.py SPEC.json    # SPEC: [[folder, "X:Y", dtype], ...]
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import torch


def main(spec_path: str) -> None:
    torch.set_num_threads(1)  # as every test process (tests/conftest.py)
    from lambdasplit.server import BodyServer, BodyService

    spec = json.loads(Path(spec_path).read_text())
    server = BodyServer([BodyService(folder, split, dtype=dtype) for folder, split, dtype in spec], port=0)
    asyncio.run(server.serve_forever(on_ready=lambda s: print(f"listening on {s.host}:{s.port}", flush=True)))


if __name__ == "__main__":
    main(sys.argv[1])
