"""adapter.trainable_token_indices: replacement rows of the embedding (and of a tied or listed head) in PEFT's key
layout, round trips with PEFT 0.21 (logits within 1e-5), only the listed rows change, the gradient of the rows
against an fp64 autograd reference, and the errors."""

from __future__ import annotations

import copy

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
)

import lorafit
from lorafit.adapters.trainable_tokens import (
    TrainableTokens,
    TrainableTokensError,
    check_new_rows_trained,
    resolve_token_strings,
)
from lorafit.models.vocabulary import resize_vocabulary

TOL = 1e-5  # fp32; the replaced logits are the same dot products as PEFT's F.linear with the patched weight
CASES = {  # (model kind, trainable_token_indices)
    "llama-list": ("llama", [1, 5, 90]),
    "llama-dict-head": ("llama", {"embed_tokens": [1, 5], "lm_head": [2, 5, 7]}),
    "tied-list": ("llama_tied", [1, 5, 90]),  # the tied head follows the embedding's rows
    "tied-other-head-rows": ("llama_tied", {"embed_tokens": [1, 5], "lm_head": [2, 5, 7]}),  # PEFT: not shared
    "qwen2-list": ("qwen2", [3, 4]),
    "gpt2-list": ("gpt2", [1, 5, 90]),
}


def build(kind: str):
    return build_tied_llama() if kind == "llama_tied" else build_tiny(kind)


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_lorafit_trainable_tokens_load_in_peft(tmp_path, case):
    kind, indices = CASES[case]
    base = build(kind)
    model = copy.deepcopy(base)
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, trainable_token_indices=indices), warn_scale=False)
    randomize_adapters(model)
    perturb_trainable(model)
    ours = model(input_ids()).logits
    lorafit.save_adapter(model, tmp_path / "ours")

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    diff = (peft_model(input_ids()).logits - ours).abs().max().item()
    print(f"{case}: lorafit->PEFT trainable tokens max logit diff {diff:.2e}")
    assert diff <= TOL

    reference = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               trainable_token_indices=indices))
    reference.save_pretrained(tmp_path / "peft")
    ours_keys = {k: v.shape for k, v in load_file(tmp_path / "ours" / "adapter_model.safetensors").items()}
    peft_keys = {k: v.shape for k, v in load_file(tmp_path / "peft" / "adapter_model.safetensors").items()}
    assert ours_keys == peft_keys and any(k.endswith(".token_adapter.trainable_tokens_delta") for k in ours_keys)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_trainable_tokens_load_in_lorafit(tmp_path, case):
    kind, indices = CASES[case]
    base = build(kind)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                trainable_token_indices=indices))
    randomize_adapters(peft_model)
    perturb_trainable(peft_model)
    theirs = peft_model.eval()(input_ids()).logits
    assert (theirs - base(input_ids()).logits).abs().max() > 0.1
    peft_model.save_pretrained(tmp_path / "peft")

    ours = lorafit.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    diff = (ours(input_ids()).logits - theirs).abs().max().item()
    print(f"{case}: PEFT->lorafit trainable tokens max logit diff {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("kind", ["llama", "llama_tied"])
def test_training_changes_only_the_listed_rows(kind):
    indices = [2, 7, 40]
    model = build(kind)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, trainable_token_indices=indices), warn_scale=False)
    embeddings = model.model.embed_tokens
    start = embeddings.merged_weight().detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = torch.cat([torch.tensor([indices]), input_ids()[:1, : 11 - len(indices)]], dim=1)  # the listed ids occur
    for _ in range(3):
        optimizer.zero_grad()
        model.train()(x, labels=x).loss.backward()
        optimizer.step()
    base_params = {n.replace(".base_layer", ""): p for n, p in model.named_parameters()
                   if ".lora_" not in n and "trainable_tokens_delta" not in n}
    for name, before in weights.items():  # every base tensor, embeddings included, bit-identical
        assert torch.equal(base_params[name], before), name
    effective = embeddings.merged_weight().detach()
    changed = (effective != start).any(dim=1).nonzero().flatten().tolist()
    assert changed == indices  # exactly the listed rows moved
    if kind == "llama_tied":
        assert isinstance(model.lm_head, TrainableTokens) and not model.lm_head.owns_delta
        assert torch.equal(model.lm_head.merged_weight(), effective)  # the head follows the same rows


def test_gradient_of_the_rows_equals_an_fp64_autograd_reference():
    """Tied model: the rows feed both the lookup and the head. Reference: the fp64 model with its (tied) weight
    trainable; the gradient of the rows is that weight's gradient at the listed rows."""
    indices = [3, 9, 41, 77]
    base = build("llama_tied")
    reference = copy.deepcopy(base).double()
    model = copy.deepcopy(base)
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8, trainable_token_indices=indices), warn_scale=False)
    x = torch.cat([torch.tensor([indices * 2]), input_ids()[:1, :3]], dim=1)
    model(x, labels=x).loss.backward()
    reference.model.embed_tokens.weight.requires_grad_(True)
    reference(x, labels=x).loss.backward()
    expected = reference.model.embed_tokens.weight.grad[indices]
    grad = model.model.embed_tokens.trainable_tokens_delta.grad
    error = (grad.double() - expected).abs().max().item()
    print(f"trainable rows: max |grad - fp64 reference| {error:.2e} (scale {expected.abs().max().item():.2e})")
    assert error <= 1e-5 * expected.abs().max().item()


def test_token_strings_resolve_through_the_vocabulary():
    config = lorafit.AdapterConfig(trainable_token_indices=["<tool>", 4])
    resolved = resolve_token_strings(config, {"<tool>": 96, "a": 4})
    assert resolved.trainable_token_indices == [96, 4]
    with pytest.raises(TrainableTokensError, match=r"'<nope>' is not in the tokenizer's vocabulary; add it with "
                                                   "data.added_tokens"):
        resolve_token_strings(lorafit.AdapterConfig(trainable_token_indices={"embed_tokens": ["<nope>"]}), {})
    with pytest.raises(TrainableTokensError, match="holds token strings"):
        lorafit.attach(build("llama"), config, warn_scale=False)


def test_bad_inputs_name_the_field_and_the_fix():
    with pytest.raises(TrainableTokensError, match=rf"token id {VOCAB} is outside its vocabulary of {VOCAB} rows"):
        lorafit.attach(build("llama"), lorafit.AdapterConfig(trainable_token_indices=[1, VOCAB]), warn_scale=False)
    with pytest.raises(lorafit.ConfigError, match="modules_to_save both name 'embed_tokens'"):
        lorafit.AdapterConfig(modules_to_save=["embed_tokens"], trainable_token_indices={"embed_tokens": [1]})
    with pytest.raises(TrainableTokensError, match="both in modules_to_save and in trainable_token_indices"):
        lorafit.attach(build("llama"), lorafit.AdapterConfig(modules_to_save=["embed_tokens"],
                                                             trainable_token_indices=[1]), warn_scale=False)
    with pytest.raises(TrainableTokensError, match="'embed_tokenz' matches no module.*candidates: embed_tokens"):
        lorafit.attach(build("llama"), lorafit.AdapterConfig(trainable_token_indices={"embed_tokenz": [1]}),
                       warn_scale=False)
    with pytest.raises(TrainableTokensError, match="'model.norm' \\(LlamaRMSNorm\\): only an embedding"):
        lorafit.attach(build("llama"), lorafit.AdapterConfig(trainable_token_indices={"model.norm": [1]}),
                       warn_scale=False)
    with pytest.raises(lorafit.ConfigError, match="lists a token twice"):
        lorafit.AdapterConfig(trainable_token_indices=[1, 1])


def test_rows_of_added_tokens_must_be_trained():
    model = build("llama")
    new_rows = resize_vocabulary(model, VOCAB + 2)
    with pytest.raises(TrainableTokensError, match=r"rows \[96, 97\] of 'lm_head' are new .*adapter.trainable_token_indices "
                                                   r"\{\.\.\., lm_head: \[\.\.\.\]\}, or put 'lm_head' in"):
        check_new_rows_trained(model, lorafit.AdapterConfig(trainable_token_indices=[96, 97]), new_rows)
    with pytest.raises(TrainableTokensError, match=r"rows \[97\] of 'model.embed_tokens' are new"):
        check_new_rows_trained(model, lorafit.AdapterConfig(modules_to_save=["lm_head"], trainable_token_indices=[96]),
                               new_rows)
    check_new_rows_trained(model, lorafit.AdapterConfig(
        trainable_token_indices={"embed_tokens": [96, 97], "lm_head": [96, 97]}), new_rows)
    check_new_rows_trained(model, lorafit.AdapterConfig(modules_to_save=["embed_tokens", "lm_head"]), new_rows)
    tied = build("llama_tied")
    tied_rows = resize_vocabulary(tied, VOCAB + 2)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    check_new_rows_trained(tied, lorafit.AdapterConfig(trainable_token_indices=[96, 97]), tied_rows)  # head follows
