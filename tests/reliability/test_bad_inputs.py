"""Bad inputs through the CLI: each ends with exit 2 and ONE error line on stderr that names the file, field or value
(`expect`, a substring of that line), no traceback, and every file that existed before is unchanged (SHA-256).

Most cases run `lorafit.cli.main` in-process (a subprocess costs seconds of start-up each); a few run the real
`lorafit` command to check what a user's terminal shows. A read-only output folder is a read-only tmpfs mount,
not chmod (the tests run as root, whom permissions do not stop); a full disk is a 200 KiB tmpfs. Both need mount
(root); where it fails, those two cases are left out and the test says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import write_tiny_run

from lorafit.cli import main
from lorafit.run_dir import LEGACY_CHECKPOINT_STATE, RunDir
from lorafit.train.checkpoint import read_checkpoint

FAST = ["evaluation.generation=false", "evaluation.every=0", "training.max_steps=2", "training.save_every=1"]
SRC = str(Path(__file__).resolve().parents[2] / "src")


@dataclass
class Case:
    name: str
    make: Callable[[Path, Path], list[str]]  # (tiny run root, this case's folder) -> the CLI arguments
    expect: str  # a part of the error line: the file, field or value it names
    subprocess: bool = False


def _run_yaml(case: Path, text: str) -> Path:
    path = case / "run.yaml"
    path.write_text(text)
    return path


def _train(root: Path, case: Path, *overrides: str) -> list[str]:
    return ["train", str(root / "run.yaml"), f"output_dir={case / 'out'}", *FAST, *overrides]


def _data(case: Path, name: str, content: bytes) -> Path:
    path = case / name
    path.write_bytes(content)
    return path


def _chat(user: str, reply: str | None = None) -> dict:
    messages = [{"role": "user", "content": user}] + ([{"role": "assistant", "content": reply}] if reply else [])
    return {"messages": messages}


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _finished_run(root: Path, case: Path, *overrides: str) -> Path:
    """A finished run in case/out (trained in-process), checkpoints at steps 1 (and 2 only if max_steps > 2)."""
    assert main(_train(root, case, *overrides)) == 0
    return case / "out"


def _interrupted_run(root: Path, case: Path) -> Path:
    """case/out as a run killed after step 2 of 3: checkpoints step-1, step-2, no summary."""
    out = _finished_run(root, case, "training.max_steps=3")
    for name in ("summary.json", "diagnosis.json", "report.html"):
        (out / name).unlink(missing_ok=True)
    return out


def _newest_checkpoint(out: Path) -> Path:
    return sorted((out / "checkpoints").glob("step-*"))[-1]


def _only_checkpoint(out: Path) -> Path:
    checkpoints = sorted((out / "checkpoints").glob("step-*"))
    for older in checkpoints[:-1]:
        for path in sorted(older.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        older.rmdir()
    return checkpoints[-1]


def _grpo_yaml(root: Path, case: Path, rewards: str, reward_code: str | None, *extra: str) -> list[str]:
    if reward_code is not None:
        (case / "rewards.py").write_text(reward_code)
    prompts = _data(case, "prompts.jsonl", _jsonl([_chat("Hello!"), _chat("Name a colour.")]))
    run = _run_yaml(case, f"""
model: {root / 'model'}
output_dir: {case / 'out'}
method: grpo
rewards: {rewards}
adapter: {{r: 4, alpha: 8}}
data: {{train: {prompts}, max_seq_len: 64}}
training: {{max_steps: 1, batch_size: 2, lr: 1.0e-2, save_every: 0, seed: 3}}
evaluation: {{generation: false, every: 0}}
grpo: {{num_generations: 2, max_new_tokens: 3, reward_timeout_s: 1}}
""")
    return ["train", str(run), *extra]


def _adapter_for_another_model(root: Path, case: Path) -> list[str]:
    from tiny_models import build_tiny

    import lorafit
    other = build_tiny("qwen2")
    lorafit.attach(other, lorafit.AdapterConfig(r=4, alpha=8))
    lorafit.save_adapter(other, case / "adapter")
    return _init_adapter_args(root, case, case / "adapter")


def _init_adapter_args(root: Path, case: Path, adapter: Path) -> list[str]:
    """Train from a saved adapter: a run file without an adapter section (the saved one's config applies)."""
    text = (root / "run.yaml").read_text().replace("adapter: {r: 4, alpha: 8, dropout: 0.1}\n", "")
    return ["train", str(_run_yaml(case, text)), f"output_dir={case / 'out2'}", *FAST, f"init_adapter={adapter}"]


def _saved_adapter(root: Path, case: Path) -> Path:
    out = _finished_run(root, case)
    return out / "adapter"


def _nan_adapter(root: Path, case: Path) -> list[str]:
    adapter = _saved_adapter(root, case)
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors[sorted(tensors)[0]][0, 0] = float("nan")
    save_file(tensors, weights)
    return _init_adapter_args(root, case, adapter)


def _list_adapter_config(root: Path, case: Path) -> list[str]:
    adapter = _saved_adapter(root, case)
    (adapter / "adapter_config.json").write_text('[{"peft_type": "LORA"}]')
    return _init_adapter_args(root, case, adapter)


def _truncated_checkpoint(root: Path, case: Path) -> list[str]:
    out = _interrupted_run(root, case)
    weights = _only_checkpoint(out) / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    return _train(root, case, "training.max_steps=3", "--resume")


def _edited_checkpoint(root: Path, case: Path) -> list[str]:
    out = _interrupted_run(root, case)
    state = _only_checkpoint(out) / "trainer_state.json"
    state.write_text(state.read_text().replace('"step": 2', '"step": 1'))
    return _train(root, case, "training.max_steps=3", "--resume")


class _Bomb:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _pickle_bomb(root: Path, case: Path) -> list[str]:
    folder = case / "out" / "checkpoints" / "step-00000001"
    folder.mkdir(parents=True)
    torch.save({"trainer": _Bomb(case / "marker")}, folder / LEGACY_CHECKPOINT_STATE)
    (case / "out" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return _train(root, case, "--resume")


def _truncated_model_weights(root: Path, case: Path) -> list[str]:
    model = case / "model"
    model.mkdir()
    for item in (root / "model").iterdir():
        (model / item.name).write_bytes(item.read_bytes())
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return _train(root, case, f"model={model}")


def _truncated_gguf(root: Path, case: Path) -> list[str]:
    gguf = _data(case, "model.gguf", b"GGUF\x03\x00\x00\x00\x07")
    return _train(root, case, f"model={gguf}")


def _locked(root: Path, case: Path) -> list[str]:
    (case / "out").mkdir()
    (case / "out" / ".lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    return _train(root, case)


def _foreign_files(root: Path, case: Path) -> list[str]:
    out = _finished_run(root, case)
    (out / "notes.txt").write_text("mine")
    return _train(root, case, "--overwrite")


MOUNTS: list[Path] = []  # tmpfs mounts made by _disk_full, unmounted at the end of the test


def _disk_full(root: Path, case: Path) -> list[str]:
    """output_dir on a 200 KiB tmpfs: checkpoint 1 (~110 KB) fits, checkpoint 2 does not (a real ENOSPC)."""
    out = case / "out"
    out.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(out)], check=True, capture_output=True)
    MOUNTS.append(out)
    return _train(root, case, "training.max_steps=3")


def _can_mount() -> bool:
    probe = Path("/tmp") / f"lorafit-mount-probe-{os.getpid()}"
    probe.mkdir(exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(probe)],
                                 capture_output=True).returncode == 0
        if mounted:
            subprocess.run(["umount", str(probe)], check=True)
        return mounted
    finally:
        probe.rmdir()


def _read_only_fs(root: Path, case: Path) -> list[str]:
    """output_dir inside a read-only mount (chmod does not stop root; a read-only file system does)."""
    folder = case / "readonly"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=4k", "tmpfs", str(folder)], check=True, capture_output=True)
    MOUNTS.append(folder)
    return _train(root, case, f"output_dir={folder / 'run'}")


CASES = [
    # the run file
    Case("run file missing", lambda r, c: ["train", str(c / "nope.yaml")], "nope.yaml"),
    Case("run file is a folder", lambda r, c: ["train", str(c)], "is a folder; pass the run's YAML file"),
    Case("YAML is a list", lambda r, c: ["train", str(_run_yaml(c, "- model\n- data\n"))], "top level must be a mapping"),
    Case("YAML is a string", lambda r, c: ["train", str(_run_yaml(c, "just words\n"))], "top level must be a mapping"),
    Case("YAML is empty", lambda r, c: ["train", str(_run_yaml(c, ""))], "model"),
    Case("YAML syntax error", lambda r, c: ["train", str(_run_yaml(c, "model: [1\n"))], "not valid YAML"),
    Case("YAML not UTF-8", lambda r, c: ["train", str(_data(c, "run.yaml", b"model: \xff\xfe\n"))], "run.yaml"),
    Case("YAML duplicate key", lambda r, c: ["train", str(_run_yaml(c, "model: a\nmodel: b\n"))], "duplicate key 'model'"),
    Case("unknown top-level key", lambda r, c: _train(r, c, "modle=x"), "modle"),
    Case("unknown nested key", lambda r, c: _train(r, c, "training.lrr=0.1"), "lrr"),
    Case("lr is a word", lambda r, c: _train(r, c, "training.lr=fast"), "training.lr"),
    Case("negative lr", lambda r, c: _train(r, c, "training.lr=-1"), "lr"),
    Case("rank zero", lambda r, c: _train(r, c, "adapter.r=0"), "r=0"),
    Case("rank is a list", lambda r, c: _train(r, c, "adapter.r=[4]"), "adapter.r"),
    Case("max_seq_len negative", lambda r, c: _train(r, c, "data.max_seq_len=-5"), "max_seq_len"),
    Case("override without =", lambda r, c: _train(r, c, "training.lr"), "key.path=value"),
    Case("override into a value", lambda r, c: _train(r, c, "model.name=x"), "model"),
    Case("unknown method", lambda r, c: _train(r, c, "method=ppo"), "ppo"),
    Case("unknown dtype", lambda r, c: _train(r, c, "dtype=float8"), "float8"),
    # the data
    Case("data file missing", lambda r, c: _train(r, c, f"data.train={c / 'none.jsonl'}"), "none.jsonl"),
    Case("data file empty", lambda r, c: _train(r, c, f"data.train={_data(c, 'e.jsonl', b'')}"), "e.jsonl"),
    Case("data file binary", lambda r, c: _train(r, c, f"data.train={_data(c, 'b.jsonl', bytes(range(256)))}"),
         "b.jsonl"),
    Case("data not UTF-8", lambda r, c: _train(r, c, "data.train=" + str(_data(c, "l.jsonl", b'{"text": "caf\xe9"}\n'))),
         "l.jsonl"),
    Case("data row not JSON", lambda r, c: _train(r, c, "data.train=" + str(_data(c, "j.jsonl", b"{oops\n"))), "j.jsonl:1"),
    Case("data row is a list", lambda r, c: _train(r, c, "data.train=" + str(_data(c, "k.jsonl", b"[1, 2]\n"))), "k.jsonl:1"),
    Case("chat without assistant turn",
         lambda r, c: _train(r, c, f"data.train={_data(c, 'u.jsonl', _jsonl([_chat('hi')]))}"), "u.jsonl"),
    Case("image in content", lambda r, c: _train(r, c, "data.train=" + str(_data(c, 'i.jsonl', _jsonl([{"messages": [
        {"role": "user", "content": [{"type": "image", "url": "cat.png"}]}, {"role": "assistant", "content": "a cat"}]}])))),
         "i.jsonl"),
    Case("unknown role", lambda r, c: _train(r, c, "data.train=" + str(_data(c, 'r.jsonl', _jsonl([{"messages": [
        {"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])))), "wizard"),
    Case("all rows longer than max_seq_len", lambda r, c: _train(r, c, "data.max_seq_len=4"), "data.max_seq_len=4"),
    Case("one-row dataset, all too long", lambda r, c: _train(
        r, c, f"data.train={_data(c, 'one.jsonl', _jsonl([_chat('x ' * 200, 'y')]))}", "data.max_seq_len=16"), "one.jsonl"),
    # the model and adapters
    Case("unknown model name", lambda r, c: _train(r, c, "model=no-such-model-xyz"), "no-such-model-xyz",
         subprocess=True),
    Case("truncated safetensors model", _truncated_model_weights, "incomplete metadata"),
    Case("truncated GGUF", _truncated_gguf, "model.gguf"),
    Case("adapter for another model", _adapter_for_another_model, "adapter"),
    Case("NaN adapter", _nan_adapter, "NaN"),
    Case("adapter_config.json is a list", _list_adapter_config, "adapter_config.json"),
    # the output folder and resume
    Case("output_dir is a file", lambda r, c: _train(r, c, f"output_dir={_data(c, 'f.txt', b'x')}"), "f.txt"),
    Case("output_dir under a file", lambda r, c: _train(r, c, f"output_dir={_data(c, 'g.txt', b'x')}/run"), "g.txt"),
    Case("used output_dir", lambda r, c: _finished_run(r, c) and _train(r, c), "--overwrite", subprocess=True),
    Case("--resume of a finished run", lambda r, c: _finished_run(r, c) and _train(r, c, "--resume"), "finished"),
    Case("--resume with --overwrite", lambda r, c: _train(r, c, "--resume", "--overwrite"), "--resume and --overwrite"),
    Case("--overwrite with foreign files", _foreign_files, "notes.txt"),
    Case("output_dir locked by a live run", _locked, ".lock"),
    Case("read-only file system", _read_only_fs, "Read-only file system"),
    Case("disk full while checkpointing", _disk_full, "No space left on device"),
    Case("truncated checkpoint", _truncated_checkpoint, "adapter_model.safetensors"),
    Case("hand-edited checkpoint", _edited_checkpoint, "trainer_state.json"),
    Case("pickle bomb trainer_state.pt", _pickle_bomb, "trainer_state.pt", subprocess=True),
    # GRPO reward functions
    Case("reward file missing", lambda r, c: _grpo_yaml(r, c, "[missing.py:score]", None), "missing.py"),
    Case("reward function missing", lambda r, c: _grpo_yaml(r, c, "[rewards.py:nope]", "def score(**k): return []\n"),
         "nope"),
    Case("reward raises", lambda r, c: _grpo_yaml(r, c, "[rewards.py:score]",
                                                  "def score(prompts, completions, **k):\n    return 1 / 0\n"), "score"),
    Case("reward hangs", lambda r, c: _grpo_yaml(r, c, "[rewards.py:score]",
                                                 "import time\ndef score(prompts, completions, **k):\n"
                                                 "    time.sleep(60)\n"), "reward_timeout_s"),
    Case("reward wrong length", lambda r, c: _grpo_yaml(r, c, "[rewards.py:score]",
                                                        "def score(prompts, completions, **k):\n    return [1.0]\n"),
         "score"),
    Case("reward NaN", lambda r, c: _grpo_yaml(r, c, "[rewards.py:score]",
                                               "def score(prompts, completions, **k):\n"
                                               "    return [float('nan')] * len(completions)\n"), "score"),
    Case("reward syntax error", lambda r, c: _grpo_yaml(r, c, "[rewards.py:score]", "def score(:\n"), "rewards.py"),
]


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(args: list[str], capsys, in_subprocess: bool) -> tuple[int, str]:
    if in_subprocess:
        env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        done = subprocess.run([sys.executable, "-m", "lorafit.cli", *args], capture_output=True, text=True, env=env,
                              timeout=300)
        return done.returncode, done.stderr
    code = main(args)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_run(tmp_path_factory.mktemp("bad_inputs"))


def test_every_bad_input_is_one_line_exit_2_and_damages_nothing(tiny, tmp_path, capsys):
    cases = CASES
    if not _can_mount():  # a real full disk needs a tmpfs mount (root); say so instead of skipping silently
        cases = [c for c in CASES if c.make not in (_disk_full, _read_only_fs)]
        print("note: cannot mount a tmpfs here, so the disk-full and read-only cases are left out")
    assert len(cases) >= 40 and len({c.name for c in cases}) == len(cases)
    try:
        _run_cases(cases, tiny, tmp_path, capsys)
    finally:
        for mount in MOUNTS:
            subprocess.run(["umount", str(mount)], check=False)


def _run_cases(cases: list[Case], tiny: Path, tmp_path: Path, capsys) -> None:
    problems, shown, tracebacks, damaged = [], [], 0, 0
    for number, case in enumerate(cases):
        folder = tmp_path / f"case{number:02d}"
        folder.mkdir()
        args = case.make(tiny, folder)
        capsys.readouterr()
        before = {**_hashes(tiny), **_hashes(folder)}
        code, err = _cli(args, capsys, case.subprocess)
        after = {**_hashes(tiny), **_hashes(folder)}
        changed = sorted(p for p, digest in before.items() if after.get(p) != digest)
        lines = err.strip().splitlines()
        error_lines = [line for line in lines if line.startswith("lorafit train: error: ")]
        expect = case.expect.replace("{case}", str(folder))
        tracebacks += "Traceback" in err
        shown.append(f"[{case.name}] {error_lines[-1] if error_lines else lines[-1:]}")
        damaged += bool(changed)
        if not (code == 2 and "Traceback" not in err and len(error_lines) == 1 and lines[-1] == error_lines[0]
                and expect in error_lines[0] and not changed):
            problems.append(f"{case.name}: exit {code}, changed {changed}, stderr tail {lines[-3:]!r}")
    print("\n".join(shown))
    print(f"{len(cases)} bad inputs, {tracebacks} tracebacks, {damaged} files damaged")
    bomb = next(n for n, c in enumerate(cases) if c.make is _pickle_bomb)
    assert not (tmp_path / f"case{bomb:02d}" / "marker").exists(), "the pickle bomb ran"
    for number in [n for n, c in enumerate(cases) if c.make is _disk_full]:  # the previous checkpoint survives
        survivors = RunDir(tmp_path / f"case{number:02d}" / "out").list_checkpoints()
        assert [p.name for p in survivors] == ["step-00000001"]
        read_checkpoint(survivors[0])
    assert not problems, "\n".join(problems)
