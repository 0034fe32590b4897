"""adapter.modules_to_save: trained copies of whole modules, PEFT's key layout, round trips with PEFT 0.21 (logits
within 1e-5), the frozen original behind disabled adapters, QLoRA's kept-16-bit embeddings, and the errors."""

from __future__ import annotations

import copy
import json
import warnings
from contextlib import contextmanager

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import (
    VOCAB,
    build_tied_llama,
    build_tiny,
    perturb_trainable,
    randomize_adapters,
    tiny_config,
)
from transformers import AutoModelForCausalLM, LlamaForSequenceClassification

import lorafit
from lorafit.adapters.model import adapters_disabled
from lorafit.adapters.modules_to_save import ModulesToSaveError, ModuleToSave
from lorafit.config import LorafitWarning

TOL = 1e-5  # fp32, the same math (a copied module computes exactly as the original class)
SAVED = {"llama": ["embed_tokens", "lm_head"], "llama_tied": ["embed_tokens", "lm_head"], "qwen2": ["lm_head"],
         "gpt2": ["wte", "lm_head"]}


def build(kind: str):
    """A tiny model; llama_tied shares one weight between the input embeddings and the head."""
    return build_tied_llama() if kind == "llama_tied" else build_tiny(kind)


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", list(SAVED))
def test_lorafit_modules_to_save_load_in_peft(tmp_path, kind):
    base = build(kind)
    model = copy.deepcopy(base)
    with pytest.warns(LorafitWarning, match="no longer tied") if kind in ("llama_tied", "gpt2") else _no_lorafit_warning():
        lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, modules_to_save=SAVED[kind]), warn_scale=False)
    randomize_adapters(model)
    perturb_trainable(model)
    ours = model(input_ids()).logits
    assert (ours - base(input_ids()).logits).abs().max() > 1.0, "the trained copies must change the logits"
    lorafit.save_adapter(model, tmp_path / "ours")

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    diff = (peft_model(input_ids()).logits - ours).abs().max().item()
    print(f"{kind}: lorafit->PEFT modules_to_save max logit diff {diff:.2e}")
    assert diff <= TOL

    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               modules_to_save=SAVED[kind]))
    reference.save_pretrained(tmp_path / "peft")
    ours_keys = {k: v.shape for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    peft_keys = {k: v.shape for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    assert ours_keys == peft_keys  # PEFT's exact layout: base_model.model.<module>.weight beside the LoRA keys
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["modules_to_save"] == SAVED[kind]


@pytest.mark.parametrize("kind", list(SAVED))
def test_peft_modules_to_save_load_in_lorafit(tmp_path, kind):
    base = build(kind)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                modules_to_save=SAVED[kind]))
    randomize_adapters(peft_model)
    perturb_trainable(peft_model)
    theirs = peft_model.eval()(input_ids()).logits
    peft_model.save_pretrained(tmp_path / "peft")

    ours = lorafit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    diff = (ours(input_ids()).logits - theirs).abs().max().item()
    print(f"{kind}: PEFT->lorafit modules_to_save max logit diff {diff:.2e}")
    assert diff <= TOL
    assert set(lorafit.adapters.modules_to_save.modules_to_save(ours)) == {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
        if type(m).__name__ == "ModulesToSaveWrapper"}


def test_score_head_of_a_classifier_roundtrips_with_peft(tmp_path):
    """A sequence-classification head (`score`, no generate): PEFT's SEQ_CLS adapters save it the same way."""
    config = tiny_config("llama")
    config.num_labels, config.pad_token_id = 3, 0
    torch.manual_seed(0)
    base = LlamaForSequenceClassification(config).eval()
    model = copy.deepcopy(base)
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, modules_to_save=["score"]), warn_scale=False)
    randomize_adapters(model)
    perturb_trainable(model)
    ours = model(input_ids()).logits
    lorafit.save_adapter(model, tmp_path / "a")
    assert "base_model.model.score.weight" in load_file(tmp_path / "a" / "adapter_model.safetensors")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()(input_ids()).logits
    diff = (theirs - ours).abs().max().item()
    print(f"score head lorafit->PEFT max logit diff {diff:.2e}")
    assert diff <= TOL

    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                task_type="SEQ_CLS"))  # saves ['classifier', 'score']
    randomize_adapters(peft_model)
    perturb_trainable(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    reloaded = lorafit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    diff = (reloaded(input_ids()).logits - peft_model.eval()(input_ids()).logits).abs().max().item()
    print(f"score head PEFT (SEQ_CLS) -> lorafit max logit diff {diff:.2e}")
    assert diff <= TOL


def test_the_copy_trains_the_original_stays_and_disabling_gives_the_base(tmp_path):
    base = build("llama_tied")
    model = copy.deepcopy(base)
    with pytest.warns(LorafitWarning):
        lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, modules_to_save=["lm_head"]), warn_scale=False)
    wrapper = model.lm_head
    assert isinstance(wrapper, ModuleToSave) and not wrapper.original_module.weight.requires_grad
    assert wrapper.trained_copy.weight.requires_grad and wrapper.trained_copy.weight is not wrapper.original_module.weight
    assert wrapper.original_module.weight is model.model.embed_tokens.weight  # the base tie is untouched
    frozen_embeddings = model.model.embed_tokens.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(input_ids(), labels=input_ids()).loss.backward()
    optimizer.step()
    assert torch.equal(model.model.embed_tokens.weight, frozen_embeddings)  # only the copy moved
    assert not torch.equal(wrapper.trained_copy.weight, frozen_embeddings)
    with adapters_disabled(model):
        torch.testing.assert_close(model(input_ids()).logits, base(input_ids()).logits, rtol=0, atol=0)
    trained = model(input_ids()).logits
    merged = lorafit.merge_and_unload(model)
    assert not merged.config.tie_word_embeddings and merged.lm_head.weight is not merged.model.embed_tokens.weight
    torch.testing.assert_close(merged(input_ids()).logits, trained, rtol=0, atol=1e-6)
    merged.save_pretrained(tmp_path / "merged")  # untied in the config: the trained head survives a reload
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(reloaded(input_ids()).logits, trained, rtol=0, atol=1e-6)


def test_unknown_module_lists_the_candidates():
    with pytest.raises(ModulesToSaveError, match=r"'lm_heda' matches no module.*candidates: embed_tokens, q_proj"):
        lorafit.attach(build_tiny("llama"), lorafit.AdapterConfig(modules_to_save=["lm_heda"]), warn_scale=False)


def test_nested_modules_and_bad_values_are_refused():
    with pytest.raises(ModulesToSaveError, match="inside 'model.layers.0.self_attn': list only the outer"):
        lorafit.attach(build_tiny("llama"), lorafit.AdapterConfig(modules_to_save=["layers.0.self_attn", "q_proj"]),
                       warn_scale=False)
    with pytest.raises(lorafit.ConfigError, match="modules_to_save='lm_head' is invalid: use a non-empty list"):
        lorafit.AdapterConfig(modules_to_save="lm_head")


def test_lora_never_adapts_a_saved_module():
    model = build_tiny("llama")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, modules_to_save=["layers.0.mlp"]), warn_scale=False)
    adapted = set(lorafit.adapters.model.lora_layers(model))
    assert adapted and not any(name.startswith("model.layers.0.mlp") for name in adapted)
    assert "model.layers.1.mlp.down_proj" in adapted



@contextmanager
def _no_lorafit_warning():
    """pytest.warns' counterpart: a LorafitWarning inside the block is an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", LorafitWarning)
        yield
