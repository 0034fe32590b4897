"""The real SmolLM2-135M: cached loading, chat answers, adapters against PEFT at full size."""

from __future__ import annotations

import copy
import subprocess
import time

import pytest
import torch
from peft import PeftModel

import lorafit
from lorafit.models import zoo

pytestmark = pytest.mark.slow


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 20) -> str:
    batch = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True).to(model.device)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)


def test_facts_of_the_real_model(smollm2):
    model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 2 and tokenizer.eos_token_id == 2
    assert greedy_answer(model, tokenizer, "What is the capital of France?") == "The capital of France is Paris."


def test_second_load_does_not_download(smollm2, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("a cached model must not be downloaded again")

    monkeypatch.setattr(subprocess, "run", no_network)
    monkeypatch.setattr(zoo.subprocess, "run", no_network)
    start = time.perf_counter()
    model, _ = lorafit.load_model("smollm2-135m")
    print(f"cached load: {time.perf_counter() - start:.2f}s")
    assert model.config.num_hidden_layers == 30


def test_all_linear_adapter_on_the_real_model_matches_peft(smollm2, tmp_path):
    base, tokenizer = smollm2
    model = lorafit.attach(copy.deepcopy(base), lorafit.AdapterConfig(r=16, alpha=32, dropout=0.05))
    report = lorafit.parameter_report(model)
    assert report.trainable == 30 * 16 * (2 * (576 + 576) + 2 * (576 + 192) + 2 * (576 + 1536) + (1536 + 576))
    assert sum(count for count, _ in report.per_kind.values()) == 210
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lorafit.adapters.model.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.01)
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    ours = model(ids).logits
    assert (ours - base(ids).logits).abs().max() > 1e-2
    lorafit.save_adapter(model, tmp_path / "adapter", base_model_name_or_path="smollm2-135m")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    diff = (peft_model(ids).logits - ours).abs().max().item()
    print(f"SmolLM2 lorafit->PEFT max logit diff: {diff:.2e}")
    assert diff <= 1e-4  # fp32 through 30 blocks, logits of magnitude ~20: summation-order noise ~1e-5
    merged = lorafit.merge_and_unload(model)
    merge_diff = (merged(ids).logits - ours).abs().max().item()
    print(f"SmolLM2 merged vs unmerged max logit diff: {merge_diff:.2e}")
    assert merge_diff <= 3e-4  # merging re-rounds each fp32 weight once (ulp ~1e-8), amplified through 30 blocks
