"""Shared test fixtures.

Converted default models (``zoo:...``) are cached under ``$LAMBDASPLIT_CACHE``.
To build them once per test run rather than once per process, every process of
a run, including pytest-xdist workers (``pytest -n 2 --dist loadfile``), points
``LAMBDASPLIT_CACHE`` at the same directory:

* ``$LAMBDASPLIT_TEST_CACHE`` if set: used as is and kept, so a developer can
  reuse conversions between runs (``LAMBDASPLIT_TEST_CACHE=/tmp/ls-cache pytest``);
* otherwise ``<tmp>/lambdasplit-test-cache-<testrunuid>``: xdist hands the same
  run uid to every worker (the controller fixes it here, before workers start);
  without xdist the uid is fresh. The controller / single process deletes it at
  the end of the run.

A user's own ``LAMBDASPLIT_CACHE`` is deliberately overridden, so tests never
read or pollute a real cache.

Every test process runs torch with one thread (see `pytest_configure`).

Fixtures: ``tiny_model_dir`` (factory of tiny random models, see
tests/tiny_models.py), ``smollm2_path`` and ``digits_path`` (bundled zoo models).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import pytest
import torch

# Make `import tiny_models` work from any test, whatever pytest's import mode.
if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_model, train_tokenizer  # noqa: E402


# The run cache directory this process created and must delete (None: not ours).
_OWNED_CACHE = pytest.StashKey[Path | None]()


def pytest_configure(config: pytest.Config) -> None:
    user_dir = os.environ.get("LAMBDASPLIT_TEST_CACHE")
    workerinput = getattr(config, "workerinput", None)
    if user_dir:
        cache, owned = Path(user_dir), False
    elif workerinput is not None:  # xdist worker: the controller owns the directory
        cache, owned = _run_cache(workerinput["testrunuid"]), False
    else:  # xdist controller or plain run
        uid = getattr(config.option, "testrunuid", None) or uuid.uuid4().hex
        if hasattr(config.option, "testrunuid"):
            config.option.testrunuid = uid  # xdist reads it when starting workers
        cache, owned = _run_cache(uid), True
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["LAMBDASPLIT_CACHE"] = str(cache)
    config.stash[_OWNED_CACHE] = cache if owned else None

    # One intra-op thread per process. On this 2-core machine (2 xdist workers,
    # other jobs alongside) two threads per process made tiny-model forwards
    # ~500x slower (spinning threads fighting for cores) and even 1024-wide
    # forwards ~6x slower; with one thread, `-n 2` uses the two cores.
    torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = config.stash.get(_OWNED_CACHE, None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)


def _run_cache(uid: str) -> Path:
    return Path(tempfile.gettempdir()) / f"lambdasplit-test-cache-{uid}"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``tiny_model_dir("llama", num_layers=6, hidden_size=64) -> Path``.

    Takes the arguments of `tiny_models.build_tiny_model` after `dest`. Each
    distinct (family, kwargs) is built once per process; all share one tokenizer.
    """
    built: dict[str, Path] = {}
    tokenizer_dir: list[Path] = []  # trained lazily, on first use

    def make(family: str, **kwargs) -> Path:
        key = repr((family, sorted(kwargs.items())))
        if key not in built:
            if not tokenizer_dir:
                tokenizer_dir.append(tmp_path_factory.mktemp("tokenizer"))
                train_tokenizer(tokenizer_dir[0])
            dest = tmp_path_factory.mktemp(f"tiny-{family}")
            built[key] = build_tiny_model(family, dest, tokenizer_dir=tokenizer_dir[0], **kwargs)
        return built[key]

    return make


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """Local folder of the bundled SmolLM2 model (converted once per run, see module doc)."""
    from lambdasplit.zoo import resolve

    return Path(resolve("zoo:smollm2"))


@pytest.fixture(scope="session")
def digits_path() -> Path:
    """Local folder of the bundled digits model (see module doc)."""
    from lambdasplit.zoo import resolve

    return Path(resolve("zoo:digits"))
