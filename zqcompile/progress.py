"""Progress on stderr for the steps that take long on real models (capture, the pass pipeline, the generation
graphs, writing and verifying engine files, evaluation), with tqdm as LKD already uses it.

On by default when stderr is a terminal; `set_enabled(True)` forces it (the CLI does), `set_enabled(False)`
silences it. Presentation only: passes never import this; the API wraps them.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm

_enabled: bool | None = None


def set_enabled(on: bool | None) -> None:
    """True: always show progress; False: never; None: when stderr is a terminal."""
    global _enabled
    _enabled = on


@contextmanager
def forced(on: bool | None) -> Iterator[None]:
    """set_enabled(on) for the duration of a block (the CLI's commands)."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def enabled() -> bool:
    if _enabled is not None:
        return _enabled
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def bar(total: int, desc: str, unit: str = "step") -> tqdm:
    """A progress bar (a no-op one when progress is off)."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(), leave=False,
                dynamic_ncols=True, mininterval=0.2)


@contextmanager
def step(desc: str, show: bool = True) -> Iterator[None]:
    """One line `desc ...` then `desc: 3.1 s` when it finishes (nothing when progress is off or `show` is
    False: steps that are quick for small inputs pass show=<input is large>)."""
    if not (enabled() and show):
        yield
        return
    t0 = time.perf_counter()
    print(f"{desc} ...", file=sys.stderr, flush=True)
    yield
    print(f"{desc}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)


def pass_bar(total: int, desc: str):
    """(bar, on_pass callback for run_pipeline) that ticks once per pass and names the pass that ran."""
    b = bar(total, desc, unit="pass")

    def on_pass(name: str, _gm) -> None:
        b.set_postfix_str(name.split("_", 1)[-1], refresh=False)
        b.update(1)
    return b, on_pass
