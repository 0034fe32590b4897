"""GGUF export of the real SmolLM2-135M with a perturbed adapter: greedy replies of the q8_0 file read by transformers
equal the merged model's; the optional llama.cpp check runs when llama-cpp-python is installed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import gguf
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM

import lorafit
from lorafit.adapters.model import lora_layers, merge_and_unload
from lorafit.evaluation.generate import generate_responses
from lorafit.export import export_adapter_gguf, export_model_gguf, source_gguf, write_modelfile

pytestmark = pytest.mark.slow
EVAL_FILE = Path(__file__).parents[2] / "examples" / "data" / "orders_eval.jsonl"
PROMPTS = 20
MAX_NEW_TOKENS = 32


def eval_chats() -> list[list[dict]]:
    """The quickstart's eval prompts (system + user, the reference reply dropped)."""
    rows = [json.loads(line) for line in EVAL_FILE.read_text().splitlines()[:PROMPTS]]
    return [[m for m in row["messages"] if m["role"] != "assistant"] for row in rows]


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    """(merged reference, tokenizer, folder with q8_0 / f16 / q4_0 / f32-base / adapter GGUFs) for a perturbed adapter."""
    base, tokenizer = smollm2
    model = lorafit.attach(copy.deepcopy(base), lorafit.AdapterConfig(r=8, alpha=16))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.01)
    folder = tmp_path_factory.mktemp("gguf")
    source = source_gguf("smollm2-135m")
    export_adapter_gguf(model, folder / "adapter.gguf")
    export_model_gguf(copy.deepcopy(base), tokenizer, folder / "base-f16.gguf", "f16", tokenizer_gguf=source)
    for export_type in ("f16", "q4_0"):
        result = export_model_gguf(copy.deepcopy(model), tokenizer, folder / f"model-{export_type}.gguf", export_type,
                                   tokenizer_gguf=source)
        print(result.summary())
    result = export_model_gguf(copy.deepcopy(model), tokenizer, folder / "model-q8_0.gguf", "q8_0", tokenizer_gguf=source)
    print(result.summary())
    reference = merge_and_unload(model, dtype=torch.float32)
    with torch.no_grad():
        ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
        assert (reference(ids).logits - base(ids).logits).abs().max() > 0.05  # the adapter matters
    return reference, tokenizer, folder


def ggml_rounded(model, qtype: gguf.GGMLQuantizationType):
    """A copy of `model` whose 2-D weights went through ggml's `qtype` round trip (gguf-py, bit-exact with ggml)."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.ndim == 2:
                param.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)))
    return rounded


def test_q8_0_greedy_replies_equal_the_merged_models(exported):
    """The q8_0 file read by transformers is the merged model with Q8_0-rounded weights: same logits, same replies.
    Against the fp32 merged model, Q8_0's rounding itself (the rounded reference does the same) changes some of
    the 32-token replies of this small model at near-ties, so that figure is reported with a loose floor."""
    reference, tokenizer, folder = exported
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="model-q8_0.gguf", dtype=torch.float32).eval()
    rounded = ggml_rounded(reference, gguf.GGMLQuantizationType.Q8_0)
    chats = eval_chats()
    ids = tokenizer.apply_chat_template(chats[0], add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        diff = (loaded(ids).logits - rounded(ids).logits).abs().max().item()
        diff_fp32 = (loaded(ids).logits - reference(ids).logits).abs().max().item()
    print(f"q8_0 file vs Q8_0-rounded merged model: max |logit diff| {diff:.2e}; vs fp32 merged {diff_fp32:.2f}")
    assert diff <= 1e-4
    expected = generate_responses(rounded, tokenizer, chats, max_new_tokens=MAX_NEW_TOKENS)
    got = generate_responses(loaded, tokenizer, chats, max_new_tokens=MAX_NEW_TOKENS)
    fp32 = generate_responses(reference, tokenizer, chats, max_new_tokens=MAX_NEW_TOKENS)
    same = sum(a == b for a, b in zip(expected, got))
    same_fp32 = sum(a == b for a, b in zip(fp32, got))
    print(f"q8_0 greedy replies identical: {same}/{len(chats)} to the rounded merged model, {same_fp32}/{len(chats)} "
          f"to the fp32 merged model")
    assert same >= 0.95 * len(chats)
    assert same_fp32 >= 0.5 * len(chats)


def test_f16_logits_and_file_facts(exported, smollm2):
    reference, tokenizer, folder = exported
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file="model-f16.gguf", dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(eval_chats()[0], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        expected, got = reference(ids).logits, loaded(ids).logits
    diff = (expected - got).abs().max().item()
    sizes = {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(folder.glob("*.gguf"))}
    print(f"f16 max |logit diff| {diff:.2e}, argmax agreement "
          f"{(expected.argmax(-1) == got.argmax(-1)).float().mean().item():.3f}; sizes MiB {sizes}")
    assert diff < 0.1  # logits of size ~20; f16 keeps ~3 significant digits per weight over 30 layers
    fields = {name: field.contents() for name, field in GGUFReader(folder / "model-q8_0.gguf").fields.items()}
    assert fields["tokenizer.ggml.pre"] == "smollm" and len(fields["tokenizer.ggml.tokens"]) == 49152
    assert len(fields["tokenizer.ggml.merges"]) == 48900 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert fields["llama.attention.head_count"] == 9 and fields["llama.attention.head_count_kv"] == 3
    assert sizes["model-q4_0.gguf"] < sizes["model-q8_0.gguf"] < sizes["model-f16.gguf"]
    modelfile = write_modelfile(folder / "model-q8_0.gguf", tokenizer).read_text()
    assert "<|im_start|>{{ .Role }}" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile


def test_llama_cpp_reads_the_exports(exported):
    """llama.cpp itself (llama-cpp-python): the merged q8_0 file, and base f16 + adapter GGUF, give the merged model's
    greedy replies. Not installed in lorafit's environment (it compiles llama.cpp from source), hence optional."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install "
                                                        "llama-cpp-python builds llama.cpp from source)")
    reference, tokenizer, folder = exported
    chats = eval_chats()
    expected = generate_responses(reference, tokenizer, chats, max_new_tokens=MAX_NEW_TOKENS)
    prompts = [tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
    for kwargs in ({"model_path": str(folder / "model-q8_0.gguf")},
                   {"model_path": str(folder / "base-f16.gguf"), "lora_path": str(folder / "adapter.gguf")}):
        llm = llama_cpp.Llama(n_ctx=512, verbose=False, **kwargs)
        got = [llm(p, max_tokens=MAX_NEW_TOKENS, temperature=0.0, stop=["<|im_end|>"])["choices"][0]["text"].strip()
               for p in prompts]
        same = sum(a == b for a, b in zip(expected, got))
        print(f"llama.cpp {kwargs}: {same}/{len(chats)} identical")
        assert same >= 0.9 * len(chats)
