"""GRPO reward functions: load `file.py:function` / `package.module:function`, call them, check what they return.

A reward function is a plain callable `fn(prompts=[...], completions=[...], **row_fields) -> list[float]`:
`prompts[i]` is the last user message that `completions[i]` answers, and every other field of the data
row (e.g. `answer`) arrives as a list aligned with the completions. Several functions are summed with weights.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.config import ConfigError
from lorafit.data import DataError
from lorafit.errors import UserError
from lorafit.run_config import RewardSpec

RESERVED_FIELDS = ("prompts", "completions")


class RewardError(UserError):
    """A reward function raised or returned something unusable; the message names the function."""


@dataclass(frozen=True)
class RewardFunction:
    """A loaded reward function, the name its metrics are logged under, and its weight in the total."""

    name: str
    spec: str
    fn: Callable[..., Any]
    weight: float = 1.0
    timeout_s: float = 60.0  # grpo.reward_timeout_s


def load_rewards(specs: list[RewardSpec], timeout_s: float = 60.0) -> list[RewardFunction]:
    """Import every reward function named in `specs`, each call limited to `timeout_s` seconds; a missing file,
    module or function is a ConfigError."""
    functions = [RewardFunction(name=s.function.rpartition(":")[2], spec=s.function, fn=_load_callable(s.function),
                                weight=s.weight, timeout_s=timeout_s) for s in specs]
    names = [f.name for f in functions]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ConfigError(f"two reward functions are named {duplicated[0]!r}; their metrics (reward/<name>) would "
                          "collide: give them different names or combine them into one function with weights.")
    return functions


def _load_callable(spec: str) -> Callable[..., Any]:
    target, _, name = spec.rpartition(":")
    module = _load_file(Path(target)) if target.endswith(".py") else _import(target, spec)
    if not hasattr(module, name):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"reward {spec!r}: {target} has no function {name!r}; it defines {', '.join(found) or 'none'}.")
    fn = getattr(module, name)
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {name} is a {type(fn).__name__}, not a function.")
    return fn


def _load_file(path: Path) -> Any:
    """Import a Python file as a module (once per file: functions of one file share it)."""
    if not path.is_file():
        raise ConfigError(f"reward file {str(path)!r} does not exist (relative paths start at {Path.cwd()} or beside "
                          "the run YAML).")
    module_name = f"lorafit_rewards_{path.stem}_{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling inside the file look themselves up here
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise ConfigError(f"reward file {str(path)!r} fails to import: {type(err).__name__}: {err}") from err
    return module


def _import(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"reward {spec!r}: cannot import {module_name!r} ({err}); use 'path/to/file.py:function' "
                          "for a file, or install the package.") from err


def score(functions: list[RewardFunction], prompts: list[str], completions: list[str],
          fields: dict[str, list[Any]]) -> dict[str, list[float]]:
    """Each function's rewards for the completions (name -> one float per completion), checked."""
    return {f.name: _call(f, prompts, completions, fields) for f in functions}


def weighted_total(functions: list[RewardFunction], scores: dict[str, list[float]]) -> list[float]:
    """The reward each completion trains on: sum over functions of weight x reward."""
    columns = [[f.weight * value for value in scores[f.name]] for f in functions]
    return [sum(values) for values in zip(*columns)]


def _call(f: RewardFunction, prompts: list[str], completions: list[str], fields: dict[str, list[Any]]) -> list[float]:
    values = _call_with_timeout(f, dict(prompts=prompts, completions=completions, **fields))
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward function {f.spec} returned a {type(values).__name__}; it must return a list of "
                          f"{len(completions)} numbers, one per completion.") from None
    if len(values) != len(completions):
        raise RewardError(f"reward function {f.spec} returned {len(values)} values for {len(completions)} "
                          "completions; it must return one number per completion.")
    for i, value in enumerate(values):
        if not isinstance(value, numbers.Real) or not math.isfinite(value):  # bools count as 0 / 1
            raise RewardError(f"reward function {f.spec} returned {value!r} for completion {i} "
                              f"({completions[i][:60]!r}); every reward must be a finite number.")
    return [float(v) for v in values]


def _call_with_timeout(f: RewardFunction, kwargs: dict[str, Any]) -> Any:
    """f.fn(**kwargs) in a worker thread, waiting at most f.timeout_s seconds.

    A thread is the portable way (signals work only in the main thread of POSIX processes, a subprocess would
    need picklable functions and arguments). Python cannot kill a thread: one that overruns keeps running in the
    background (a daemon thread, so it does not keep the process alive), and the run stops with this error.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["values"] = f.fn(**kwargs)
        except BaseException as err:  # noqa: BLE001 - reported from the caller's thread below
            outcome["error"] = err

    worker = threading.Thread(target=run, name=f"reward {f.spec}", daemon=True)
    worker.start()
    worker.join(f.timeout_s)
    if worker.is_alive():
        raise RewardError(f"reward function {f.spec} did not return within {f.timeout_s:g} s "
                          f"(grpo.reward_timeout_s={f.timeout_s:g}); make it faster, or allow more time, e.g. "
                          f"grpo.reward_timeout_s={max(2 * f.timeout_s, 120):g}.")
    if "error" in outcome:
        err = outcome["error"]  # sys.exit() inside the function too: it is the function failing, not lorafit
        raise RewardError(f"reward function {f.spec} raised {type(err).__name__}: {err}") from err
    return outcome["values"]


def row_fields(rows: list[dict[str, Any]], source: list[str]) -> dict[str, list[Any]]:
    """Extra fields of the data rows as columns (None where a row lacks one), for the reward functions' kwargs."""
    keys = sorted({k for row in rows for k in row})
    for key in keys:
        if key in RESERVED_FIELDS:
            where = source[next(i for i, row in enumerate(rows) if key in row)]
            raise DataError(f"{where}: a data field named {key!r} would clash with the reward functions' own "
                              f"{key!r} argument; rename that field.")
    return {k: [row.get(k) for row in rows] for k in keys}
