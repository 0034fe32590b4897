"""Merged-model GGUF export: the file read back by transformers' GGUF loader computes lorafit's merged model."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from export_helpers import TOKENIZER, adapted, gguf_fields, load_gguf, merged_copy, tiny_model, token_ids
from transformers import AutoTokenizer

from lorafit.config import AdapterConfig
from lorafit.export import export_model_gguf
from lorafit.models.load import quantize_block_linears

# max |logit difference| allowed per type (tiny models, logits of size ~1): f32 is the same arithmetic; f16 keeps
# 11 significant bits (2^-11 relative per weight), bf16 8 (2^-8); q8_0 rounds each weight to absmax/127 per block of 32.
TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1e-2, "q8_0": 2e-2}
# argmax agreement: a random tiny model's logits are near-uniform over 400 tokens (median top-1 lead ~0.02, the size
# of a q8_0 / bf16 logit error), so near-ties may flip there; the real-model slow test checks greedy replies instead.
AGREEMENT = {"f32": 0.99, "f16": 0.99, "bf16": 0.95, "q8_0": 0.95}
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}


def compare(reference, loaded, ids) -> tuple[float, float]:
    with torch.no_grad():
        expected, got = reference(ids).logits, loaded(ids).logits
    agreement = (expected.argmax(-1) == got.argmax(-1)).float().mean().item()
    return (expected - got).abs().max().item(), agreement


@pytest.mark.parametrize("export_type", list(TOLERANCE))
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_exported_gguf_computes_the_merged_model(arch, export_type, tmp_path):
    model = adapted(tiny_model(arch))
    reference = merged_copy(model)
    base = tiny_model(arch)
    ids = token_ids()
    assert compare(base, reference, ids)[0] > 0.05  # the adapter changes the outputs: the check below can fail
    path = tmp_path / f"{arch}.gguf"
    result = export_model_gguf(model, TOKENIZER, path, export_type)
    max_diff, agreement = compare(reference, load_gguf(path), ids)
    print(f"{arch} {export_type}: max |logit diff| {max_diff:.2e}, argmax agreement {agreement:.3f}, {result.size_bytes} B")
    assert max_diff <= TOLERANCE[export_type]
    assert agreement >= AGREEMENT[export_type]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q4_0_export_is_the_merged_model_with_ggml_q4_0_weights(arch, tmp_path):
    """Q4_0 is too coarse for a tolerance against the float model, so the reference is the merged model whose
    quantised tensors went through gguf-py's Q4_0 (ggml's) round trip; the rest must then be exact."""
    model = adapted(tiny_model(arch))
    reference = merged_copy(model)
    path = tmp_path / "q4.gguf"
    export_model_gguf(model, TOKENIZER, path, "q4_0")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert types["output.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 48: not a multiple of 32
    q4 = gguf.GGMLQuantizationType.Q4_0
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.ndim == 2 and param.shape[-1] % 32 == 0 and name != "lm_head.weight":
                rounded = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), q4), q4)
                param.copy_(torch.from_numpy(rounded))
            elif param.ndim == 2 and name == "lm_head.weight":
                q8 = gguf.GGMLQuantizationType.Q8_0
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), q8), q8)))
            elif param.ndim == 2:
                param.copy_(param.half().float())
    max_diff, _ = compare(reference, load_gguf(path), token_ids())
    assert max_diff <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_keys_are_the_ones_llama_cpp_reads(arch, tmp_path):
    model = adapted(tiny_model(arch))
    path = tmp_path / "m.gguf"
    export_model_gguf(model, TOKENIZER, path, "q8_0", name="tiny")
    fields = gguf_fields(path)
    config = model.config
    assert fields["general.architecture"] == arch and fields["general.type"] == "model"
    assert fields["general.file_type"] == FILE_TYPE["q8_0"] and fields["general.quantization_version"] == 2
    expected = {"block_count": 2, "context_length": 64, "embedding_length": 32, "feed_forward_length": 48,
                "attention.head_count": 4, "attention.head_count_kv": 2, "rope.dimension_count": 8,
                "vocab_size": len(TOKENIZER)}
    for key, value in expected.items():
        assert fields[f"{arch}.{key}"] == value, key
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    tokens = fields["tokenizer.ggml.tokens"]
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt2"
    assert tokens == [TOKENIZER.convert_ids_to_tokens(i) for i in range(len(TOKENIZER))]
    control = [tokens[i] for i, kind in enumerate(fields["tokenizer.ggml.token_type"]) if kind == gguf.TokenType.CONTROL]
    assert control == ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|end|>"]
    assert len(fields["tokenizer.ggml.merges"]) > 0
    assert fields["tokenizer.ggml.bos_token_id"] == TOKENIZER.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == TOKENIZER.eos_token_id == TOKENIZER.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == TOKENIZER.chat_template
    assert "output.weight" in {t.name for t in gguf.GGUFReader(path).tensors}


def test_tokenizer_read_back_by_transformers_encodes_the_same(tmp_path):
    path = tmp_path / "m.gguf"
    export_model_gguf(tiny_model("llama"), TOKENIZER, path, "f32")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    texts = ["Hello! How can I help you today?", "The capital of France is Paris.", "zebra 12345 ünïcode\n\ttabs",
             TOKENIZER.apply_chat_template([{"role": "user", "content": "Tell me a joke"}], tokenize=False)]
    for text in texts:
        assert loaded(text)["input_ids"] == TOKENIZER(text)["input_ids"], text
    assert loaded.chat_template == TOKENIZER.chat_template


def test_tokenizer_keys_are_copied_from_a_source_gguf(tmp_path):
    source = tmp_path / "source.gguf"
    export_model_gguf(tiny_model("llama"), TOKENIZER, source, "f32")
    path = tmp_path / "copy.gguf"
    export_model_gguf(adapted(tiny_model("llama")), None, path, "f16", tokenizer_gguf=source)
    expected = {k: v for k, v in gguf_fields(source).items() if k.startswith("tokenizer.")}
    got = {k: v for k, v in gguf_fields(path).items() if k.startswith("tokenizer.")}
    assert got == expected and len(got) >= 8


def test_a_source_gguf_of_another_vocabulary_is_refused(tmp_path):
    source = tmp_path / "source.gguf"
    export_model_gguf(tiny_model("llama"), TOKENIZER, source, "f32")
    other = tiny_model("llama")
    other.resize_token_embeddings(len(TOKENIZER) + 32)
    with pytest.raises(ValueError, match="lists 400 tokens but the model has 432"):
        export_model_gguf(other, None, tmp_path / "x.gguf", "f32", tokenizer_gguf=source)


def test_embedding_rows_beyond_the_tokenizer_become_unused_pad_tokens(tmp_path):
    model = tiny_model("qwen2")
    model.resize_token_embeddings(len(TOKENIZER) + 16)  # Qwen2 pads its embeddings the same way
    path = tmp_path / "m.gguf"
    export_model_gguf(model, TOKENIZER, path, "f32")
    fields = gguf_fields(path)
    assert fields["tokenizer.ggml.tokens"][-16:] == [f"[PAD{i}]" for i in range(400, 416)]
    assert set(fields["tokenizer.ggml.token_type"][-16:]) == {gguf.TokenType.UNUSED}


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    model = adapted(tiny_model("llama", tie=True))
    reference = merged_copy(model)
    path = tmp_path / "tied.gguf"
    export_model_gguf(model, TOKENIZER, path, "f32")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    loaded = load_gguf(path)
    assert loaded.config.tie_word_embeddings
    assert compare(reference, loaded, token_ids())[0] <= 1e-5


@pytest.mark.parametrize("variant", ["dora", "qlora", "qdora"])
def test_dora_and_4bit_bases_are_merged_in_fp32(variant, tmp_path):
    model = tiny_model("llama")
    if variant in ("qlora", "qdora"):
        quantize_block_linears(model, compute_dtype=torch.float32)
    adapted(model, AdapterConfig(r=4, alpha=8, use_dora=variant != "qlora"))
    with torch.no_grad():
        adapter_logits = model(token_ids()).logits
    reference = merged_copy(model)
    path = tmp_path / "m.gguf"
    export_model_gguf(model, TOKENIZER, path, "f32")
    loaded = load_gguf(path)
    assert compare(reference, loaded, token_ids())[0] <= 1e-5
    with torch.no_grad():
        assert (loaded(token_ids()).logits - adapter_logits).abs().max() <= 1e-4  # = the adapted model it came from


def test_rsLoRA_and_patterns_merge_with_their_own_scales(tmp_path):
    config = AdapterConfig(r=4, alpha=8, use_rslora=True, rank_pattern={"k_proj": 2}, alpha_pattern={"v_proj": 3.0})
    model = adapted(tiny_model("qwen2"), config)
    reference = merged_copy(model)
    path = tmp_path / "m.gguf"
    export_model_gguf(copy.deepcopy(model), TOKENIZER, path, "f32")
    assert compare(reference, load_gguf(path), token_ids())[0] <= 1e-5
    assert np.isfinite(reference.lm_head.weight.detach().numpy()).all()
