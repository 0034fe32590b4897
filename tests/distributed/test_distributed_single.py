"""lorafit.distributed in a world of one process, and the pieces that need no process group."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import VOCAB, build_tiny

import lorafit
from lorafit import distributed
from lorafit.config import ConfigError
from lorafit.data.chat import IGNORE, TokenizedExample
from lorafit.train.batches import fixed_batches, rank_micro_batches


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [0, 1, 2, 5, 7, 8])
def test_shares_are_disjoint_and_cover_every_item_once(world, count):
    items = list(range(count))
    shares = [distributed.share(items, r, world) for r in range(world)]
    assert sorted(i for s in shares for i in s) == items
    assert [len(s) for s in shares] == [count // world + (r < count % world) for r in range(world)]
    assert shares == [distributed.share(items, r, world) for r in range(world)]  # deterministic


def rows(count: int) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for i in range(count):
        ids = torch.randint(4, VOCAB, (4 + i,), generator=generator).tolist()
        out.append(TokenizedExample(ids, [IGNORE] * (1 + i % 3) + ids[1 + i % 3:], False, f"r{i}"))
    return out


@pytest.mark.parametrize("count,world,micro", [(5, 2, 2), (1, 2, 1), (3, 4, 1), (8, 2, 3), (7, 3, 2)])
def test_rank_micro_batches_give_every_rank_the_same_number_of_passes(count, world, micro):
    step = rows(count)
    per_rank = [rank_micro_batches(step, micro, 0, rank=r, world_size=world) for r in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # the same number of forward passes (collectives)
    total = sum(b.targets for batches in per_rank for b in batches)
    assert total == sum(b.targets for b in fixed_batches(step, micro, 0))  # fillers add no targets
    for batches in per_rank:
        for batch in batches:
            assert batch.targets == int((batch.tensors["targets"] != IGNORE).sum())


@pytest.mark.parametrize("count,world,size", [(0, 2, 1), (1, 2, 1), (5, 2, 2), (3, 4, 1), (8, 2, 3), (7, 3, 2)])
def test_rank_chunks_cover_every_item_once_in_the_same_number_of_chunks(count, world, size):
    items = list(range(count))
    per_rank = [distributed.rank_chunks(items, size, rank=r, world_size=world) for r in range(world)]
    assert len({len(chunks) for chunks in per_rank}) == 1  # the same number of forward passes (collectives)
    assert len(per_rank[0]) == math.ceil(math.ceil(count / world) / size)
    real = [i for chunks in per_rank for chunk, is_real in chunks if is_real for i in chunk]
    assert sorted(real) == items  # the real chunks hold each item exactly once
    for rank, chunks in enumerate(per_rank):
        assert [i for chunk, is_real in chunks if is_real for i in chunk] == distributed.share(items, rank, world)
        assert all(1 <= len(chunk) <= size for chunk, _ in chunks)  # a filler is a real item, never empty
    assert distributed.rank_chunks(items, size, rank=0, world_size=1) == \
        [(items[i:i + size], True) for i in range(0, count, size)]


def test_gather_shares_in_a_world_of_one_returns_the_rows_in_float64():
    rows_ = torch.tensor([[1.5, -2.0], [0.25, 3.0], [7.0, 8.0]], dtype=torch.float32)
    gathered = distributed.gather_shares(rows_, 3)
    assert gathered.dtype == torch.float64 and torch.equal(gathered, rows_.double())


def test_world_of_one_is_the_single_process_path():
    step = rows(5)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    mine = rank_micro_batches(step, 2, 0, rank=0, world_size=1)
    ref = fixed_batches(step, 2, 0)
    assert len(mine) == len(ref) and all(torch.equal(a.tensors["targets"], b.tensors["targets"]) for a, b in zip(mine, ref))
    assert distributed.all_reduce_sum(7) == 7 and distributed.all_reduce_sum(2.5) == 2.5
    assert distributed.gradient_scale(40) == 1 / 40
    assert distributed.init() is distributed.context()  # idempotent
    with pytest.raises(ValueError, match="global_targets=0"):
        distributed.gradient_scale(0)


def test_wrap_in_a_world_of_one_runs_functions_on_the_model(input_ids):
    model = lorafit.attach(build_tiny("llama"), lorafit.AdapterConfig(r=2, alpha=4), warn_scale=False)
    wrapped = distributed.wrap(model, "fsdp")
    assert distributed.unwrap(wrapped) is model
    torch.testing.assert_close(wrapped(lambda m, x: m(x).logits, input_ids), model(input_ids).logits, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="strategy='zero3' is unknown"):
        distributed.wrap(model, "zero3")
    with pytest.raises(ConfigError, match="no trainable parameter"):
        distributed.wrap(build_tiny("llama").requires_grad_(False), "ddp")
    assert distributed.decoder_blocks(model) == list(model.model.layers)


def test_bad_launch_environment_is_named(monkeypatch):
    monkeypatch.setattr(distributed, "_context", None)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="WORLD_SIZE='two' is not an integer"):
        distributed.init()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="RANK=2 is outside 0..WORLD_SIZE-1=1"):
        distributed.init()
    with pytest.raises(ConfigError, match="timeout_minutes=0"):
        distributed.init(timeout_minutes=0)


def test_strategy_choice_follows_the_memory_estimate():
    assert distributed.choose_strategy("ddp", 10**12, 10**9) == ("ddp", "set in the config")
    strategy, why = distributed.choose_strategy("auto", 20 * 10**9, 16 * 10**9)
    assert strategy == "fsdp" and "20.0 GB" in why and "16.0 GB" in why
    assert distributed.choose_strategy(None, 8 * 10**9, 16 * 10**9)[0] == "ddp"
    with pytest.raises(ConfigError, match="strategy='fsdp1'"):
        distributed.choose_strategy("fsdp1", 1, 1)
    assert distributed.device_memory_bytes(torch.device("cpu")) > 10**8

