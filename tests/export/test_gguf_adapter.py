"""Adapter GGUF: llama.cpp's keys and shapes, and base + (alpha / r) · lora_b @ lora_a = the merged weight."""

from __future__ import annotations

import copy
import math

import gguf
import numpy as np
import pytest
import torch
from export_helpers import TOKENIZER, adapted, gguf_fields, merged_copy, tiny_model

from lorafit.adapters.model import lora_layers
from lorafit.config import AdapterConfig
from lorafit.export import export_adapter_gguf, export_model_gguf

CONFIGS = {
    "plain": AdapterConfig(r=4, alpha=8),
    "rslora": AdapterConfig(r=4, alpha=8, use_rslora=True),
    "patterns": AdapterConfig(r=4, alpha=8, rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3.0}),
}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row order (pairs back to halves), written independently of the exporter."""
    return rows.reshape(heads, rows.shape[0] // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def tensors(path) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("variant", list(CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_base_plus_lora_in_the_file_is_the_merged_weight(arch, variant, tmp_path):
    base = tiny_model(arch)
    model = adapted(copy.deepcopy(base), CONFIGS[variant])
    export_model_gguf(copy.deepcopy(base), TOKENIZER, tmp_path / "base.gguf", "f32")
    export_model_gguf(copy.deepcopy(model), TOKENIZER, tmp_path / "merged.gguf", "f32")
    export_adapter_gguf(model, tmp_path / "adapter.gguf")
    fields = gguf_fields(tmp_path / "adapter.gguf")
    config = CONFIGS[variant]
    alpha = config.alpha * math.sqrt(config.r) if config.use_rslora else config.alpha
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == arch
    assert fields["adapter.lora.alpha"] == pytest.approx(alpha)
    adapter, base_t, merged_t = (tensors(tmp_path / f) for f in ("adapter.gguf", "base.gguf", "merged.gguf"))
    assert len(adapter) == 2 * 7 * 2
    reference = merged_copy(model)
    for name in sorted(n.removesuffix(".lora_a") for n in adapter if n.endswith(".lora_a")):
        a, b, w0, w = adapter[name + ".lora_a"], adapter[name + ".lora_b"], base_t[name], merged_t[name]
        # llama.cpp's checks (llama-adapter.cpp): ne[0] of the model and lora_a agree, ne[1] of model and lora_b, rank
        assert a.shape[0] == w0.shape[0] and b.shape[1] == w0.shape[1] and a.shape[1] == b.shape[0], name
        rank = int(b.shape[0])  # llama.cpp takes r from lora_b
        expected_rank = 2 if (variant == "patterns" and "attn_k" in name) else 4
        assert rank == expected_rank
        update = (alpha / rank) * (b.data.astype(np.float64) @ a.data.astype(np.float64))  # llama.cpp's scale
        assert np.abs(w0.data + update - w.data).max() <= 1e-5, name
        # the same in Hugging Face row order, against lorafit's own merged weight
        block, kind = name.split(".")[1], name.split(".")[2]
        module = f"model.layers.{block}.{HF_NAMES[kind]}"
        lora_b = b.data.astype(np.float64)
        if arch == "llama" and kind in ("attn_q", "attn_k"):
            lora_b = unpermute(lora_b, 4 if kind == "attn_q" else 2)
        hf_base = base.get_submodule(module).weight.detach().double().numpy()
        hf_merged = reference.get_submodule(module).weight.detach().double().numpy()
        assert np.abs(hf_base + (alpha / rank) * lora_b @ a.data - hf_merged).max() <= 1e-5, module


def test_the_model_and_its_adapter_are_unchanged_by_the_adapter_export(tmp_path):
    model = adapted(tiny_model("llama"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_adapter_gguf(model, tmp_path / "a.gguf")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(lora_layers(model)) == 14


@pytest.mark.parametrize(("config", "message"), [
    (AdapterConfig(r=4, alpha=8, use_dora=True), "DoRA adapter cannot be a llama.cpp LoRA GGUF"),
    (AdapterConfig(r=4, alpha=8, init="pissa"), "PiSSA adapter is in residual form"),
    (AdapterConfig(r=4, alpha=8, init="loftq"), "LoftQ adapter corrects the NF4-quantised base"),
    (AdapterConfig(r=4, alpha=8, bias="all"), "also trains biases"),
    (AdapterConfig(r=4, alpha=8, modules_to_save=["lm_head"]), r"whole modules or token rows \(modules_to_save\)"),
    (AdapterConfig(r=4, alpha=8, trainable_token_indices=[3]), r"token rows \(trainable_token_indices\)"),
])
def test_adapters_llama_cpp_cannot_express_are_refused_with_the_merged_export_suggested(config, message, tmp_path):
    model = adapted(tiny_model("llama"), config)
    with pytest.raises(ValueError, match=message) as err:
        export_adapter_gguf(model, tmp_path / "a.gguf")
    assert "--gguf PATH" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "a.gguf").exists()


def test_a_model_without_adapter_is_refused(tmp_path):
    with pytest.raises(ValueError, match="needs an adapter"):
        export_adapter_gguf(tiny_model("llama"), tmp_path / "a.gguf")
