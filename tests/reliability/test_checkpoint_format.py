"""Checkpoints without pickle: exact round-trips (AdamW, 8-bit AdamW, scheduler, RNG), the manifest, finite tensors,
fallback to an older checkpoint, and pickled checkpoints of earlier versions refused without running."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import build_tiny, randomize_adapters

import lorafit
from lorafit.adapters.io import adapter_state_dict
from lorafit.errors import CheckpointError, UserError
from lorafit.train.checkpoint import (
    LEGACY_STATE_FILE,
    TrainerState,
    gather_training_state,
    load_checkpoint,
    newest_valid_checkpoint,
    read_checkpoint,
    restore_checkpoint,
    write_checkpoint,
)
from lorafit.train.checkpoint_format import MANIFEST, read_state, write_manifest, write_state
from lorafit.train.schedule import make_scheduler

SRC = Path(lorafit.__file__).parent


def make_run(seed: int = 0, steps: int = 3, total: int = 10):
    """A tiny adapted model, AdamW and the project's schedule after `steps` optimiser steps."""
    model = build_tiny("llama", seed=0)
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8))
    randomize_adapters(model, seed=seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    scheduler = make_scheduler(optimizer, total, 2, "cosine")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randint(0, 96, (2, 7), generator=generator)).logits.square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
    return model, optimizer, scheduler


def assert_same_tree(a, b, where="state"):
    """Equal structure, key types, Python types and bitwise-equal tensors (dtype and shape included)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_tree(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tree(x, y, f"{where}/{i}")
    else:
        assert a == b, (where, a, b)


def test_adamw_state_round_trips_exactly_and_training_continues_identically(tmp_path):
    model, optimizer, _ = make_run()
    write_state(tmp_path, "optimizer", optimizer.state_dict())
    restored = read_state(tmp_path, "optimizer")
    assert_same_tree(optimizer.state_dict(), restored)  # int keys, betas tuple, step tensors, exp_avg(_sq) bits
    assert all(s["step"].item() == 3 for s in restored["state"].values())

    twin, twin_optimizer, _ = make_run(steps=0)
    twin.load_state_dict(model.state_dict())
    twin_optimizer.load_state_dict(restored)
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):  # one more identical step on each
        m(torch.arange(7).view(1, 7)).logits.square().mean().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(adapter_state_dict(model).values(), adapter_state_dict(twin).values()))


def test_bitsandbytes_8bit_adamw_state_round_trips(tmp_path):
    """A state of another shape: int step, a nested dict of uint8 codes and float absmax (bitsandbytes' own)."""
    bnb = pytest.importorskip("bitsandbytes")  # in the `test` extra; reported as a skip when absent
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(64, 64))
    optimizer = bnb.optim.AdamW8bit([weight], lr=1e-3, min_8bit_size=16)
    for _ in range(2):
        weight.grad = torch.randn(64, 64)
        optimizer.step()
    state = optimizer.state_dict()
    write_state(tmp_path, "optimizer", state)
    restored = read_state(tmp_path, "optimizer")
    assert_same_tree(state, restored)
    assert any(t.dtype == torch.uint8 for t in load_file(tmp_path / "optimizer.safetensors").values())

    twin_weight = torch.nn.Parameter(weight.detach().clone())
    twin = bnb.optim.AdamW8bit([twin_weight], lr=1e-3, min_8bit_size=16)
    twin.load_state_dict(restored)
    grad = torch.randn(64, 64)
    weight.grad, twin_weight.grad = grad.clone(), grad.clone()
    optimizer.step()
    twin.step()
    assert torch.equal(weight, twin_weight)


def test_state_trees_keep_key_types_tuples_and_none(tmp_path):
    tree = {"state": {0: {"step": 4, "m": torch.arange(6, dtype=torch.bfloat16).view(2, 3)}, 7: {}},
            "groups": [{"betas": (0.9, 0.999), "fused": None, "name": "x", "lr": 1e-3, "flag": True,
                        "inf": float("inf")}],
            ("a", 1): [(), [None]]}
    write_state(tmp_path, "tree", tree)
    assert_same_tree(tree, read_state(tmp_path, "tree"))
    assert "tensor" in (tmp_path / "tree.json").read_text()  # tensors live in the safetensors file, not the JSON


def test_scheduler_is_plain_json_and_round_trips(tmp_path):
    _, optimizer, scheduler = make_run(steps=4)
    write_state(tmp_path, "scheduler", scheduler.state_dict())
    assert not (tmp_path / "scheduler.safetensors").exists()
    saved = read_state(tmp_path, "scheduler")
    assert saved["lr_lambdas"] == [{"total_steps": 10, "warmup_steps": 2, "kind": "cosine"}]  # not None: checkable
    _, fresh_optimizer, fresh = make_run(steps=0)
    fresh_optimizer.load_state_dict(optimizer.state_dict())
    fresh.load_state_dict(saved)
    assert fresh.state_dict() == scheduler.state_dict()
    lrs = []
    for sched, opt in ((scheduler, optimizer), (fresh, fresh_optimizer)):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == lrs[1]


def test_checkpoint_restores_adapter_optimizer_scheduler_and_rng(tmp_path):
    model, optimizer, scheduler = make_run()
    torch.manual_seed(11)
    random.seed(12)
    target = write_checkpoint(tmp_path / "step-00000003", model, *gather_training_state(model, optimizer), scheduler, TrainerState(3, 120))
    expected = (torch.rand(5), random.random(), torch.randint(0, 1000, (3,)))
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "adapter/adapter_config.json", "adapter/adapter_model.safetensors", MANIFEST, "optimizer.json",
        "optimizer.safetensors", "rng.json", "rng.safetensors", "scheduler.json", "trainer_state.json"]

    twin, twin_optimizer, twin_scheduler = make_run(seed=5, steps=0)
    torch.manual_seed(99)
    random.seed(98)
    state = load_checkpoint(target, twin, twin_optimizer, twin_scheduler)
    assert state == TrainerState(3, 120)
    after = (torch.rand(5), random.random(), torch.randint(0, 1000, (3,)))
    assert torch.equal(expected[0], after[0]) and expected[1] == after[1] and torch.equal(expected[2], after[2])
    assert all(torch.equal(a, b) for a, b in zip(adapter_state_dict(model).values(), adapter_state_dict(twin).values()))
    assert_same_tree(optimizer.state_dict(), twin_optimizer.state_dict())
    assert twin_scheduler.state_dict() == scheduler.state_dict()


def test_a_checkpoint_of_another_schedule_is_refused(tmp_path):
    model, optimizer, scheduler = make_run(total=10)
    target = write_checkpoint(tmp_path / "step-00000003", model, *gather_training_state(model, optimizer), scheduler, TrainerState(3, 0))
    twin, twin_optimizer, twin_scheduler = make_run(steps=0, total=20)
    with pytest.raises(CheckpointError, match=r"scheduler.json.*schedule.*total_steps': 10.*total_steps': 20"):
        load_checkpoint(target, twin, twin_optimizer, twin_scheduler)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    model, optimizer, scheduler = make_run()
    return write_checkpoint(tmp_path / "checkpoints" / "step-00000003", model, *gather_training_state(model, optimizer), scheduler, TrainerState(3, 0))


def _add_manifest_entry(folder: Path, name: str) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][name] = {"size": 1, "sha256": "0"}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(("damage", "needle"), [
    (lambda c: (c / "optimizer.safetensors").unlink(), r"optimizer.safetensors is missing"),
    (lambda c: (c / "adapter" / "adapter_model.safetensors").write_bytes(b"short"),
     r"adapter_model.safetensors has 5 bytes, the manifest says \d+"),
    (lambda c: _flip_last_byte(c / "rng.safetensors"), r"rng.safetensors does not match its SHA-256"),
    (lambda c: (c / "trainer_state.json").write_text('{"step": 9, "tokens_seen": 0}\n'),
     r"trainer_state.json (has \d+ bytes|does not match)"),
    (lambda c: (c / MANIFEST).unlink(), r"manifest.json is missing"),
    (lambda c: (c / MANIFEST).write_text("{not json"), r"manifest.json cannot be read"),
    (lambda c: (c / MANIFEST).write_text('{"format": "lorafit-checkpoint", "version": 99, "files": {}}'),
     r"format version 99"),
    (lambda c: _add_manifest_entry(c, "../../etc/passwd"), r"'\.\./\.\./etc/passwd' is not a file inside"),
])
def test_a_damaged_checkpoint_is_refused_naming_the_file(checkpoint, damage, needle):
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=needle):
        read_checkpoint(checkpoint)


def test_an_edited_state_file_with_a_matching_manifest_is_refused(checkpoint):
    """Someone edits optimizer.json and rewrites the manifest: the structure check still names the file."""
    (checkpoint / "optimizer.json").write_text('{"dict": [["state", {"tensor": "not-there"}]]}')
    write_manifest(checkpoint)
    with pytest.raises(CheckpointError, match=r"optimizer.json is not a state written by lorafit .*not-there"):
        read_checkpoint(checkpoint)


@pytest.mark.parametrize("field", ["optimizer", "step", "__class__"])
def test_a_scheduler_state_cannot_replace_the_optimizer_or_a_method(checkpoint, field):
    state = read_state(checkpoint, "scheduler")
    state[field] = 0
    write_state(checkpoint, "scheduler", state)
    write_manifest(checkpoint)
    model, optimizer, scheduler = make_run(steps=0)
    with pytest.raises(CheckpointError, match=rf"scheduler.json: field '{field}' is no scheduler state"):
        load_checkpoint(checkpoint, model, optimizer, scheduler)
    assert callable(scheduler.step) and scheduler.optimizer is optimizer


@pytest.mark.parametrize(("file", "value"), [("optimizer.safetensors", float("nan")),
                                             ("adapter/adapter_model.safetensors", float("inf"))])
def test_non_finite_tensors_are_refused_naming_file_and_tensor(checkpoint, file, value):
    tensors = load_file(checkpoint / file)
    key = sorted(k for k, t in tensors.items() if t.is_floating_point() and t.dim() > 0)[0]
    tensors[key][0] = value
    save_file(tensors, checkpoint / file)
    write_manifest(checkpoint)  # a consistent manifest: the values themselves are what is wrong
    kind = "NaN" if value != value else "inf"
    with pytest.raises(CheckpointError, match=rf"{file}: tensor '{key}' holds {kind} values"):
        read_checkpoint(checkpoint)


def test_restore_leaves_nothing_changed_when_the_checkpoint_is_bad(checkpoint):
    model, optimizer, scheduler = make_run(seed=7, steps=0)
    before = {k: v.clone() for k, v in adapter_state_dict(model).items()}
    _flip_last_byte(checkpoint / "optimizer.safetensors")
    with pytest.raises(CheckpointError):
        load_checkpoint(checkpoint, model, optimizer, scheduler)
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(model).items())
    assert optimizer.state_dict()["state"] == {}


def test_fallback_to_the_previous_checkpoint_with_a_warning(tmp_path):
    model, optimizer, scheduler = make_run()
    older = write_checkpoint(tmp_path / "step-00000002", model, *gather_training_state(model, optimizer), scheduler, TrainerState(2, 0))
    newer = write_checkpoint(tmp_path / "step-00000004", model, *gather_training_state(model, optimizer), scheduler, TrainerState(4, 0))
    assert newest_valid_checkpoint([older, newer]).trainer.step == 4
    _flip_last_byte(newer / "optimizer.safetensors")
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-00000004.*optimizer.safetensors does not match"):
        saved = newest_valid_checkpoint([older, newer])
    assert saved.path == older and saved.trainer.step == 2
    twin, twin_optimizer, twin_scheduler = make_run(steps=0)
    assert restore_checkpoint(saved, twin, twin_optimizer, twin_scheduler).step == 2

    (older / MANIFEST).unlink()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"step-00000004.*and 1 older checkpoints"):
        newest_valid_checkpoint([older, newer])
    assert newest_valid_checkpoint([]) is None


class _Bomb:
    """Unpickling this runs code: it writes a marker file (what a hostile trainer_state.pt could do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _legacy_checkpoint(folder: Path, payload) -> Path:
    model, optimizer, scheduler = make_run()
    write_checkpoint(folder, model, *gather_training_state(model, optimizer), scheduler, TrainerState(3, 0))
    (folder / MANIFEST).unlink()
    torch.save(payload, folder / LEGACY_STATE_FILE)
    return folder


def test_a_pickle_bomb_is_refused_without_running(tmp_path):
    marker = tmp_path / "marker"
    folder = _legacy_checkpoint(tmp_path / "step-00000003", {"trainer": _Bomb(marker)})
    assert b"write_text" in (folder / LEGACY_STATE_FILE).read_bytes()  # the file does hold the payload
    model, optimizer, scheduler = make_run(steps=0)
    with pytest.raises(CheckpointError, match=r"trainer_state.pt is a pickled checkpoint .*--trust-checkpoint"):
        load_checkpoint(folder, model, optimizer, scheduler)
    assert not marker.exists()
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-00000003"), pytest.raises(CheckpointError):
        newest_valid_checkpoint([folder])
    assert not marker.exists()
    assert isinstance(CheckpointError("x"), UserError)


def test_a_trusted_pickled_checkpoint_of_an_earlier_version_still_resumes(tmp_path):
    model, optimizer, scheduler = make_run()
    legacy = {"trainer": {"step": 3, "tokens_seen": 50}, "optimizer": optimizer.state_dict(),
              "scheduler": scheduler.state_dict(), "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    folder = _legacy_checkpoint(tmp_path / "step-00000003", legacy)
    twin, twin_optimizer, twin_scheduler = make_run(seed=4, steps=0)
    with pytest.warns(UserWarning, match="pickled checkpoint .* can run code"):
        state = load_checkpoint(folder, twin, twin_optimizer, twin_scheduler, trust_checkpoint=True)
    assert state == TrainerState(3, 50)
    assert_same_tree(optimizer.state_dict(), twin_optimizer.state_dict())


def test_only_the_trusted_legacy_path_unpickles():
    """torch.load(weights_only=False) appears once in lorafit: the --trust-checkpoint branch."""
    hits = [(p.relative_to(SRC).as_posix(), line.strip()) for p in SRC.rglob("*.py")
            for line in p.read_text().splitlines() if "weights_only=False" in line]
    assert [h[0] for h in hits] == ["train/checkpoint.py"], hits
    assert "trusted by the user" in hits[0][1]
    assert not any("pickle.load" in p.read_text() for p in SRC.rglob("*.py"))
