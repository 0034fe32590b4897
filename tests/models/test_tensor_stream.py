"""Streaming 4-bit load: tensors read one at a time with file reads (no memory map), peak bounded by one tensor."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peak_memory import measure_peak_bytes
from safetensors.torch import load_file, save_file
from tiny_models import tiny_chat_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

import lorafit
from lorafit.diagnose.memory import nf4_bytes
from lorafit.models import load as load_module
from lorafit.models import tensor_stream
from lorafit.models.tensor_stream import SafetensorsStream, TensorStreamError
from lorafit.quant import Linear4bit, quantize_nf4


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    with torch._dynamo.config.patch(disable=True):
        yield


def test_reader_returns_what_safetensors_wrote(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "bf16": torch.randn(5, 7, generator=g).to(torch.bfloat16),
        "f32": torch.randn(3, 2, 4, generator=g),
        "f16": torch.randn(9, generator=g).half(),
        "i64": torch.arange(-3, 8),
        "u8": torch.arange(0, 250, 7, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(dict(list(tensors.items())[:4]), tmp_path / "a.safetensors")
    save_file(dict(list(tensors.items())[4:]), tmp_path / "b.safetensors")
    expected = {**load_file(tmp_path / "a.safetensors"), **load_file(tmp_path / "b.safetensors")}
    with SafetensorsStream([tmp_path / "a.safetensors", tmp_path / "b.safetensors"]) as stream:
        assert sorted(stream.keys()) == sorted(tensors)
        for key, value in expected.items():
            got = stream.read(key)
            assert got.dtype == value.dtype and got.shape == value.shape
            assert torch.equal(got, value), key
            assert stream.nbytes(key) == value.numel() * value.element_size()
        assert stream.bytes_read == sum(v.numel() * v.element_size() for v in expected.values())


def test_read_as_another_dtype_converts_chunk_by_chunk(tmp_path, monkeypatch):
    """bf16 read as fp32 equals safetensors' tensor .float(); the allocator peak is the fp32 result plus one
    chunk (here 1000 bytes of a 20 kB tensor), not the whole bf16 tensor beside it. Integers are never cast."""
    monkeypatch.setattr(tensor_stream, "READ_CHUNK_BYTES", 1000)
    weight = torch.randn(100, 101, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)  # 10100 values
    save_file({"w": weight, "ids": torch.arange(7)}, tmp_path / "w.safetensors")
    with SafetensorsStream([tmp_path / "w.safetensors"]) as stream:
        got, peak = measure_peak_bytes(lambda: stream.read("w", torch.float32))
        assert got.dtype == torch.float32 and torch.equal(got, load_file(tmp_path / "w.safetensors")["w"].float())
        assert peak <= got.numel() * 4 + 1000 + 1024  # + the profiler's own small allocations
        assert stream.read("ids", torch.float32).dtype == torch.int64
        assert stream.bytes_read == weight.numel() * 2 + 7 * 8


def test_truncated_and_foreign_files_are_named(tmp_path):
    save_file({"w": torch.ones(100)}, tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-8])
    with SafetensorsStream([tmp_path / "cut.safetensors"]) as stream, pytest.raises(TensorStreamError, match="cut.safetensors is truncated"):
        stream.read("w")
    (tmp_path / "junk.safetensors").write_bytes(b"\x03")
    with pytest.raises(TensorStreamError, match="junk.safetensors is not a safetensors file"):
        SafetensorsStream([tmp_path / "junk.safetensors"])
    save_file({"f8": torch.zeros(4, dtype=torch.float8_e4m3fn)}, tmp_path / "f8.safetensors")
    with pytest.raises(TensorStreamError, match="tensor f8 has dtype F8_E4M3"):
        SafetensorsStream([tmp_path / "f8.safetensors"])


def sharded_model(tmp_path: Path) -> tuple[Path, int, int]:
    """An 8-block Llama saved in bf16 over several shards; returns (folder, float32 bytes, largest fp32 tensor bytes)."""
    config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=384, num_hidden_layers=8,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="300KB")
    tiny_chat_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) >= 4  # the premise: several shards
    sizes = [p.numel() * 4 for p in model.parameters()]
    return folder, sum(sizes), max(sizes)


def loaded_bytes(model: torch.nn.Module) -> int:
    """What the loaded model must hold: its float tensors, and each Linear4bit's NF4 storage (bitsandbytes' size)."""
    floats = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return floats + sum(nf4_bytes(m.in_features * m.out_features) for m in model.modules() if isinstance(m, Linear4bit))


def test_streamed_load_holds_one_tensor_in_flight(tmp_path):
    """Allocator peak of the load <= the loaded model (NF4 sizes) + 6x the largest fp32 tensor, far below the
    float model.

    The 6x: the bf16 read (0.5x), its fp32 cast (1x) and quantize_nf4's temporaries on it (under 4x: absmax
    per block, scaled copy, the code index per weight as int64 is 2x, packed bytes). A load that held every
    tensor, or a whole shard, would exceed the bound: the float model is 20x the largest tensor here.
    """
    folder, float_bytes, largest = sharded_model(tmp_path)
    model, peak = measure_peak_bytes(lambda: lorafit.load_model(str(folder), device="cpu", quantize="nf4")[0])
    final = loaded_bytes(model)
    assert float_bytes > final + 6 * largest  # the bound below can tell a streamed load from a whole one
    assert peak <= final + 6 * largest, (peak, final, largest)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps, which only Linux has")
def test_no_shard_is_memory_mapped_while_loading(tmp_path, monkeypatch):
    """A memory-mapped shard keeps every page read in the process's RSS; the streamed load maps none."""
    folder, _, _ = sharded_model(tmp_path)
    shards = [str(p) for p in folder.glob("model-*.safetensors")]
    mapped = []

    def watching_quantize(weight, **kwargs):
        maps = Path("/proc/self/maps").read_text()
        mapped.extend(shard for shard in shards if shard in maps)
        return quantize_nf4(weight, **kwargs)

    monkeypatch.setattr(load_module, "quantize_nf4", watching_quantize)
    lorafit.load_model(str(folder), device="cpu", quantize="nf4")
    assert mapped == []
    with pytest.MonkeyPatch.context() as patch:  # the premise: safetensors' own reader does map them
        patch.setattr(load_module, "SafetensorsStream", _MappedStream)
        lorafit.load_model(str(folder), device="cpu", quantize="nf4")
    assert set(mapped) == set(shards)


class _MappedStream(SafetensorsStream):
    """The same interface over safetensors' safe_open (memory-mapped), to show what the test detects."""

    def __init__(self, files):
        from safetensors import safe_open

        super().__init__(files)
        self._handles = {path: safe_open(path, framework="pt") for path in {p for p, *_ in self._entries.values()}}

    def read(self, key, dtype=None):
        return self._handles[self._entries[key][0]].get_tensor(key)
