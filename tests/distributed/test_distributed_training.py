"""2 processes (torchrun, gloo, CPU) vs 1 process on a tiny Llama, fp32 and 4-bit base, DDP and FSDP2.

One torchrun launch runs every scenario (run_scenarios.py); the 1-process references run here, through the
same loop (dist_scenario.train) in a world of one.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dist_scenario import CHECKPOINT_STEP, RESUMED, SCENARIOS, STEPS, reference_name, train
from safetensors.torch import load_file
from tiny_models import VOCAB, build_tiny

import lorafit
from lorafit import distributed
from lorafit.adapters.io import WEIGHTS_NAME, load_adapter

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Output folders: every scenario on 2 processes (one torchrun launch) and the 1-process references."""
    out = tmp_path_factory.mktemp("dist")
    src = Path(lorafit.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(HERE.parent), str(HERE)]), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    assert distributed.world_size() == 1  # the 1-process runs below have no process group
    for name in RESUMED:  # checkpoints of 1-process runs, which the 2-process launch resumes
        train(name, out / "one-first" / name, stop=CHECKPOINT_STEP, checkpoint_at=CHECKPOINT_STEP)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "run_scenarios.py"), str(out / "two"), str(out / "one-first")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    references = {}
    for name in sorted({reference_name(n) for n in SCENARIOS}):
        references[name] = train(name, out / "one" / name)
    return out, references


def record(folder: Path, rank: int) -> dict:
    return json.loads((folder / f"rank{rank}.json").read_text())


@pytest.mark.parametrize("name", SCENARIOS)
def test_losses_and_grad_norms_equal_one_process(runs, name):
    out, _ = runs
    one = record(out / "one" / reference_name(name), 0)
    for rank in (0, 1):
        two = record(out / "two" / name, rank)
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(two["losses"], one["losses"]))
        norm_diff = max(abs(a - b) / abs(b) for a, b in zip(two["norms"], one["norms"]))
        print(f"{name} rank {rank}: max relative diff of the per-step loss {loss_diff:.1e}, of the grad norm {norm_diff:.1e}")
        assert len(two["losses"]) == STEPS
        torch.testing.assert_close(two["losses"], one["losses"], rtol=1e-5, atol=0)
        torch.testing.assert_close(two["norms"], one["norms"], rtol=1e-5, atol=0)
    assert any(norm > 0.25 for norm in one["norms"]) and len(set(one["losses"])) == STEPS  # clipping is exercised


@pytest.mark.parametrize("name", SCENARIOS)
def test_saved_adapter_equals_one_process_and_loads_in_peft(runs, name):
    out, references = runs
    peft = pytest.importorskip("peft")
    two, one = load_file(str(out / "two" / name / "adapter" / WEIGHTS_NAME)), load_file(str(out / "one" / reference_name(name) / "adapter" / WEIGHTS_NAME))
    per_layer = 3 if "dora" in name else 2  # A, B (and DoRA's magnitude)
    assert sorted(two) == sorted(one) and len(two) == 7 * 2 * per_layer  # 7 linears x 2 blocks
    diff = max((two[k] - one[k]).abs().max().item() for k in one)
    print(f"{name}: max |adapter 2 processes - 1 process| = {diff:.1e}")
    assert diff <= 1e-5
    assert min(one[k].abs().max().item() for k in one) > 1e-3  # trained: B moved away from 0
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(build_tiny("llama"), str(out / "two" / name / "adapter")).eval()(ids).logits
        ours = load_adapter(build_tiny("llama"), out / "two" / name / "adapter")(ids).logits
        trained = references[reference_name(name)](lambda model, x: model(x).logits, ids)
    assert (theirs - ours).abs().max().item() <= 1e-5
    if reference_name(name).startswith("fp32"):  # the trained 1-process model itself (a 4-bit one has another base than PEFT's)
        assert (theirs - trained).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n.startswith("fsdp")])
def test_every_rank_shard_reaches_the_file(runs, name):
    """Each rank filled its own dim-0 shard with rank + 1 before saving: rank 0's rows hold 1, rank 1's rows 2."""
    out, _ = runs
    tensors = load_file(str(out / "two" / name / "adapter-rank-marked" / WEIGHTS_NAME))
    for key, tensor in tensors.items():
        split = math.ceil(tensor.shape[0] / 2)  # FSDP2 shards dim 0 like torch.chunk
        assert torch.all(tensor[:split] == 1) and torch.all(tensor[split:] == 2), key


@pytest.mark.parametrize("name", SCENARIOS)
def test_ranks_see_disjoint_shares_covering_each_step(runs, name):
    out, _ = runs
    one = record(out / "one" / reference_name(name), 0)
    rank0, rank1 = record(out / "two" / name, 0), record(out / "two" / name, 1)
    for step, rows in enumerate(one["seen"]):
        assert not set(rank0["seen"][step]) & set(rank1["seen"][step])
        assert sorted(rank0["seen"][step] + rank1["seen"][step]) == sorted(rows)
        assert (len(rank0["seen"][step]), len(rank1["seen"][step])) == (3, 2)  # 5 rows: uneven shares
    assert rank0["micro_batches"] == rank1["micro_batches"] == [2] * STEPS  # rank 1 runs a filler micro-batch


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n.startswith("ddp")])
def test_ddp_replicas_hold_identical_adapters_after_every_step(runs, name):
    out, _ = runs
    for rank in (0, 1):
        assert record(out / "two" / name, rank)["replica_diff"] == [0.0] * STEPS


@pytest.mark.parametrize("name", SCENARIOS)
def test_fsdp_halves_the_parameter_bytes_per_rank(runs, name):
    out, _ = runs
    for rank in (0, 1):
        r = record(out / "two" / name, rank)
        ratio = r["bytes_local"] / r["bytes_full"]
        print(f"{name} rank {rank}: {r['bytes_local']} of {r['bytes_full']} parameter bytes ({ratio:.3f})")
        if name.startswith("fsdp"):
            assert 0.49 <= ratio <= 0.51  # dim-0 shards; tiny tensors (nested absmax: 1 value) round up on rank 0
        else:
            assert ratio == 1.0
    if name == "fsdp-nf4":  # the 4-bit base really is packed codes: its full bytes are ~60% of the fp32 model's
        assert r["bytes_full"] < 0.65 * record(out / "two" / "fsdp-fp32", 0)["bytes_full"]


@pytest.mark.parametrize("name", RESUMED)
def test_resume_on_two_processes_and_on_one_equals_the_uninterrupted_run(runs, tmp_path, name):
    """A 2-process run checkpointed after CHECKPOINT_STEP steps, resumed on 2 processes and on 1 process; and a
    1-process run's checkpoint resumed on 2 processes."""
    out, _ = runs
    whole = record(out / "two" / name, 0)["losses"]
    resumed_two = record(out / "two" / f"{name}-resumed", 0)["losses"]
    train(name, tmp_path, start=CHECKPOINT_STEP, resume_from=out / "two" / f"{name}-first" / "checkpoint")
    resumed_one = record(tmp_path, 0)["losses"]
    print(f"{name}: uninterrupted {whole[CHECKPOINT_STEP:]}, resumed on 2 {resumed_two}, on 1 {resumed_one}")
    torch.testing.assert_close(resumed_two, whole[CHECKPOINT_STEP:], rtol=1e-6, atol=0)
    torch.testing.assert_close(resumed_one, whole[CHECKPOINT_STEP:], rtol=1e-5, atol=0)
    from_one = record(out / "two" / f"{name}-from-one", 0)["losses"]  # a 1-process checkpoint resumed on 2
    torch.testing.assert_close(from_one, whole[CHECKPOINT_STEP:], rtol=1e-5, atol=0)
    final_two = load_file(str(out / "two" / name / "adapter" / WEIGHTS_NAME))
    final_one = load_file(str(tmp_path / "adapter" / WEIGHTS_NAME))
    assert max((final_two[k] - final_one[k]).abs().max().item() for k in final_two) <= 1e-5


def test_an_error_on_one_rank_ends_every_rank_with_that_error(tmp_path):
    """Rank 1 raises while rank 0 waits in a barrier: torchrun stops rank 0 and reports rank 1's error (no hang)."""
    src = Path(lorafit.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(src), str(HERE)]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(HERE / "fail_on_one_rank.py")]
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.monotonic() - started
    print(f"failing launch ended after {elapsed:.1f} s with exit code {result.returncode}")
    assert result.returncode != 0
    assert "rank 1 failed on purpose" in result.stdout + result.stderr
    assert "rank      : 1" in result.stderr  # torchrun's failure summary names the failing rank
    assert elapsed < 120  # far below the 10-minute collective timeout the script sets
