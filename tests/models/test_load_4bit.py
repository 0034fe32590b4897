"""load_model(..., quantize="nf4"): block linears become Linear4bit, streamed from safetensors on the meta device."""

from __future__ import annotations

import copy

import pytest
import torch
from nf4_reference import bnb_round_trip, reference_nf4
from safetensors.torch import save_file
from tiny_models import VOCAB, build_tiny, tiny_chat_tokenizer
from torch import nn
from transformers import AutoModelForCausalLM

import lorafit
from lorafit.config import LorafitWarning
from lorafit.models import load as load_module
from lorafit.models import quantize_block_linears
from lorafit.quant import Linear4bit, dequantize_nf4, quantize_nf4

BLOCK_LINEARS = [f"model.layers.{i}.{name}" for i in range(2) for name in
                 ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    """bitsandbytes wraps its CPU dequantisation in torch.compile; compiling for each shape takes seconds here."""
    with torch._dynamo.config.patch(disable=True):
        yield


def saved_tiny(tmp_path, arch: str, tie: bool = False):
    """A tiny random model (weights ~N(0, 0.02)) and its folder written by save_pretrained, with a tokenizer."""
    model = build_tiny(arch)
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    folder = tmp_path / arch
    model.save_pretrained(folder)
    tiny_chat_tokenizer().save_pretrained(folder)
    return model, folder


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(4))


def with_reference_nf4_weights(model: nn.Module) -> nn.Module:
    """The float model with each block linear weight replaced by the fp64 reference NF4 round trip (no double
    quantisation). Not bitsandbytes': on AVX-512 CPUs its kernels dequantise these 32-wide rows wrongly (nf4_reference)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in BLOCK_LINEARS:
            weight = reference.get_submodule(name).weight
            weight.copy_(reference_nf4(weight).values)
    return reference


@pytest.mark.parametrize("arch,tie", [("llama", True), ("qwen2", False)])
def test_block_linears_become_4bit_and_logits_match_the_nf4_reference(tmp_path, arch, tie):
    model, folder = saved_tiny(tmp_path, arch, tie)
    quantized, _ = lorafit.load_model(str(folder), device="cpu", quantize="nf4", double_quant=False)
    four_bit = sorted(name for name, module in quantized.named_modules() if isinstance(module, Linear4bit))
    assert four_bit == sorted(BLOCK_LINEARS)
    assert type(quantized.lm_head) is nn.Linear and type(quantized.model.embed_tokens) is nn.Embedding
    assert (quantized.lm_head.weight is quantized.model.embed_tokens.weight) == tie
    if arch == "qwen2":  # q/k/v biases are kept (in float) by Linear4bit
        assert torch.equal(quantized.model.layers[1].self_attn.q_proj.bias, model.model.layers[1].self_attn.q_proj.bias)
    for name, tensor in model.state_dict().items():  # everything that is not quantised is loaded unchanged
        if not any(name.startswith(linear + ".") for linear in BLOCK_LINEARS):
            assert torch.equal(quantized.state_dict()[name], tensor), name
    for name, buffer in model.named_buffers():  # rotary inv_freq: rebuilt after meta-device construction
        assert torch.equal(quantized.get_buffer(name), buffer), name
    x = ids()
    with torch.no_grad():
        ours, reference, float_logits = quantized(x).logits, with_reference_nf4_weights(model)(x).logits, model(x).logits
    diff = (ours - reference).abs().max().item()
    error = (ours - float_logits).abs().max().item()
    relative = (torch.linalg.vector_norm(ours - float_logits) / torch.linalg.vector_norm(float_logits)).item()
    print(f"{arch}: max |4-bit - fp64 NF4 reference| {diff:.1e}; vs the fp32 model: max diff {error:.2e}, "
          f"relative error {relative:.3f}")
    assert diff <= 1e-6  # identical weights; only fp32 summation order may differ
    assert 0 < relative < 0.2  # NF4 noise on every block weight moves the logits, but not beyond recognition


def test_double_quant_default_and_bf16(tmp_path):
    model, folder = saved_tiny(tmp_path, "llama")
    quantized, _ = lorafit.load_model(str(folder), device="cpu", quantize="nf4", dtype=torch.bfloat16)
    layer = quantized.model.layers[0].mlp.down_proj
    assert layer.quant_state.double_quant and layer.quant_state.dtype == torch.bfloat16
    assert layer.compute_dtype == torch.float32  # the default under LORAFIT_BF16=0 (conftest)
    assert quantized.model.embed_tokens.weight.dtype == torch.bfloat16
    expected = quantize_nf4(model.model.layers[0].mlp.down_proj.weight.to(torch.bfloat16))
    assert torch.equal(layer.quant_state.packed, expected.packed) and torch.equal(layer.quant_state.absmax, expected.absmax)


def test_the_float_model_is_never_materialised(tmp_path, monkeypatch):
    """At every quantise call, no block linear of the model being built holds a real (non-meta) float weight."""
    _, folder = saved_tiny(tmp_path, "llama")
    built, calls = [], []
    original_from_config = AutoModelForCausalLM.from_config

    def capture(*args, **kwargs):
        built.append(original_from_config(*args, **kwargs))
        return built[-1]

    def counting_quantize(weight, **kwargs):
        model = built[0]
        materialised = [name for name, module in model.named_modules()
                        if isinstance(module, nn.Linear) and name in BLOCK_LINEARS and not module.weight.is_meta]
        calls.append((tuple(weight.shape), materialised))
        return quantize_nf4(weight, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", capture)
    monkeypatch.setattr(load_module, "quantize_nf4", counting_quantize)
    lorafit.load_model(str(folder), device="cpu", quantize="nf4")
    assert len(calls) == len(BLOCK_LINEARS)
    assert all(materialised == [] for _, materialised in calls)
    assert sorted({shape for shape, _ in calls}) == [(16, 32), (32, 32), (32, 48), (48, 32)]


def test_quantize_block_linears_in_memory_equals_the_streamed_load(tmp_path):
    model, folder = saved_tiny(tmp_path, "llama", tie=True)
    streamed, _ = lorafit.load_model(str(folder), device="cpu", quantize="nf4")
    names = quantize_block_linears(model)
    assert names == BLOCK_LINEARS
    for name in names:
        ours, theirs = model.get_submodule(name).quant_state, streamed.get_submodule(name).quant_state
        assert torch.equal(dequantize_nf4(ours), dequantize_nf4(theirs)), name


def test_checkpoint_with_other_key_names_falls_back_to_transformers(tmp_path):
    """A base-model checkpoint (keys without the "model." prefix): transformers maps the names, then we quantise."""
    model, folder = saved_tiny(tmp_path, "llama", tie=True)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (renamed / file).write_bytes((folder / file).read_bytes())
    save_file({key: value.contiguous() for key, value in model.model.state_dict().items()},
              renamed / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(LorafitWarning, match="not the model's own.*loading the whole model through transformers"):
        fallback, _ = lorafit.load_model(str(renamed), device="cpu", quantize="nf4")
    streamed, _ = lorafit.load_model(str(folder), device="cpu", quantize="nf4")
    assert sorted(name for name, m in fallback.named_modules() if isinstance(m, Linear4bit)) == sorted(BLOCK_LINEARS)
    x = ids()
    with torch.no_grad():
        assert torch.equal(fallback(x).logits, streamed(x).logits)


def test_unknown_scheme_and_models_without_block_linears(tmp_path):
    with pytest.raises(lorafit.ModelLoadError, match="quantize='nf3' is not supported: use None or one of: nf4"):
        lorafit.load_model(str(tmp_path / "does-not-matter"), quantize="nf3")
    _, folder = saved_tiny(tmp_path, "gpt2")
    with pytest.raises(lorafit.ModelLoadError, match="no nn.Linear layers inside its transformer blocks.*Conv1D"):
        lorafit.load_model(str(folder), device="cpu", quantize="nf4")


def test_block_linear_names_never_include_the_head_or_embeddings():
    model = build_tiny("qwen2")
    assert load_module.block_linear_names(model) == BLOCK_LINEARS


@pytest.mark.slow
def test_real_model_in_4bit_still_answers(smollm2):
    base, tokenizer = smollm2
    model, _ = lorafit.load_model("smollm2-135m", device="cpu", quantize="nf4")
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 210
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = copy.deepcopy(base)  # bitsandbytes' NF4 with double quantisation, dequantised into the float model
    with torch.no_grad():
        for name in load_module.block_linear_names(reference):
            weight = reference.get_submodule(name).weight
            weight.copy_(bnb_round_trip(weight, double_quant=True))
    batch = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                          add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        ours, bnb_logits, float_logits = model(**batch).logits, reference(**batch).logits, base(**batch).logits
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def relative(a, b):
        return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()

    print(f"4-bit answer: {answer!r}; logits relative error vs fp32: ours {relative(ours, float_logits):.3f}, "
          f"bitsandbytes {relative(bnb_logits, float_logits):.3f}; ours vs bitsandbytes {relative(ours, bnb_logits):.4f}")
    assert answer.startswith("The capital of France is Paris")
    # Same NF4 codes; only ~0.2% of the 8-bit absmax codes differ (bitsandbytes' CPU search is not
    # always nearest, see test_quant_nf4), which moves the logits by well under 2%.
    assert relative(ours, bnb_logits) < 0.02
