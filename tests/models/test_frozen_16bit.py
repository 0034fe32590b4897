"""QLoRA keeps a 16-bit checkpoint's embeddings and head in 16 bits (models/frozen_16bit.py); results stay fp32's.

References: the same model with those two tensors upcast to fp32 copies in plain nn.Embedding / nn.Linear
(bf16 -> fp32 is exact, so only fp32 summation order may differ: 1e-5 relative), and fp64 computations.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from tiny_models import VOCAB, build_tiny, randomize_adapters, tiny_chat_tokenizer
from torch import nn

import lorafit
from lorafit import device
from lorafit.models import frozen_16bit
from lorafit.models.frozen_16bit import (
    Frozen16bitEmbedding,
    Frozen16bitLinear,
    matmul_weight,
    matmul_weight_t,
)
from lorafit.train.loss import head_token_logprobs, target_loss_sum


@pytest.fixture(autouse=True)
def small_slices(monkeypatch):
    """Slices of 5 rows (hidden 32, fp32): the tiny head of 96+ rows is upcast in many slices, the last one short."""
    monkeypatch.setattr(frozen_16bit, "SLICE_BYTES", 5 * 32 * 4)


def bf16_checkpoint(tmp_path, tie: bool):
    model = build_tiny("llama")
    if tie:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    model.to(torch.bfloat16)
    folder = tmp_path / f"bf16-tie{tie}"
    model.save_pretrained(folder)
    tiny_chat_tokenizer().save_pretrained(folder)
    return model, folder


def fp32_copy(model: nn.Module) -> nn.Module:
    """The model with its kept-16-bit embeddings and head replaced by plain fp32 modules holding exact upcasts."""
    reference = copy.deepcopy(model)
    embeddings = reference.get_input_embeddings()
    plain = nn.Embedding(embeddings.num_embeddings, embeddings.embedding_dim, padding_idx=embeddings.padding_idx)
    plain.weight = nn.Parameter(embeddings.weight.detach().float(), requires_grad=False)
    reference.set_input_embeddings(plain)
    head = reference.get_output_embeddings()
    linear = nn.Linear(head.in_features, head.out_features, bias=False)
    linear.weight = plain.weight if head.weight is embeddings.weight else nn.Parameter(head.weight.detach().float(),
                                                                                      requires_grad=False)
    reference.set_output_embeddings(linear)
    return reference


def assert_close_at_scale(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """fp32 against an fp32 copy or fp64: every error within 1e-5 of the tensor's largest entry. fp32 sums of ~100
    terms are off by ~1e-7 of their scale; an elementwise rtol would fail on entries that cancel to near 0."""
    assert (ours.double() - reference.double()).abs().max() <= 1e-5 * reference.abs().max()


def compare_gradients(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Next-token loss (the chunked head loss) of both models on `x`, backward; asserts equal losses and trainable
    gradients within assert_close_at_scale; returns the model's gradients by name."""
    batch = {"input_ids": x, "targets": torch.roll(x, -1, dims=1)}
    losses = [target_loss_sum(m, batch) for m in (model, reference)]
    for loss in losses:
        loss.backward()
    assert losses[0].item() == pytest.approx(losses[1].item(), rel=1e-6)
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    ref_grads = {name: p.grad for name, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and grads
    for name, grad in grads.items():
        assert_close_at_scale(grad, ref_grads[name])
    return grads


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("tie", [False, True])
def test_embeddings_and_head_stay_in_the_checkpoints_bf16(tmp_path, tie):
    original, folder = bf16_checkpoint(tmp_path, tie)
    model, _ = lorafit.load_model(str(folder), device="cpu", quantize="nf4")  # dtype fp32
    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embeddings) is Frozen16bitEmbedding and type(head) is Frozen16bitLinear
    assert torch.equal(embeddings.weight, original.model.embed_tokens.weight)  # the checkpoint's bits
    assert torch.equal(head.weight, original.lm_head.weight)
    assert (head.weight is embeddings.weight) == tie
    assert not embeddings.weight.requires_grad and not head.weight.requires_grad
    assert model.model.norm.weight.dtype == torch.float32  # small tensors: the model dtype
    assert model.model.layers[0].mlp.down_proj.compute_dtype == torch.float32


def test_an_fp32_checkpoint_or_a_16bit_model_changes_nothing(tmp_path):
    _, folder = bf16_checkpoint(tmp_path, tie=False)
    as_bf16, _ = lorafit.load_model(str(folder), device="cpu", quantize="nf4", dtype=torch.bfloat16)
    assert type(as_bf16.get_input_embeddings()) is nn.Embedding and type(as_bf16.get_output_embeddings()) is nn.Linear
    fp32_folder = tmp_path / "fp32"
    build_tiny("llama").save_pretrained(fp32_folder)
    tiny_chat_tokenizer().save_pretrained(fp32_folder)
    fp32, _ = lorafit.load_model(str(fp32_folder), device="cpu", quantize="nf4")
    assert fp32.get_input_embeddings().weight.dtype == torch.float32
    assert type(fp32.get_output_embeddings()) is nn.Linear
    unquantised, _ = lorafit.load_model(str(folder), device="cpu")  # the rule is QLoRA's only
    assert unquantised.get_input_embeddings().weight.dtype == torch.float32


@pytest.mark.parametrize("tie", [False, True])
def test_logits_loss_and_adapter_gradients_equal_an_fp32_copy(tmp_path, tie):
    _, folder = bf16_checkpoint(tmp_path, tie)
    model, _ = lorafit.load_model(str(folder), device="cpu", quantize="nf4")
    reference = fp32_copy(model)
    for m in (model, reference):
        torch.manual_seed(0)
        lorafit.attach(m, lorafit.AdapterConfig(r=4, alpha=8), warn_scale=False)
        randomize_adapters(m)  # B != 0: gradients reach every A
    x = ids()
    compare_gradients(model, reference, x)
    with torch.no_grad():  # the head module itself (evaluation, generation, the stock loss)
        torch.testing.assert_close(model(x).logits, reference(x).logits, rtol=1e-5, atol=1e-6)


def test_head_loss_and_gradient_with_a_bf16_weight_match_fp64(monkeypatch):
    """Three row chunks (256, 256, 88) of a 100 x 32 bf16 head upcast in 20 slices: the fp64 math of the same weight."""
    monkeypatch.setattr(device, "HEAD_CHUNK_BYTES", 256 * 100 * 4)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(600, 32, generator=generator, requires_grad=True)
    weight = torch.randn(100, 32, generator=generator).to(torch.bfloat16)
    targets = torch.randint(0, 100, (600,), generator=generator)
    loss = -head_token_logprobs(hidden, weight, targets).sum()
    loss.backward()
    hidden64 = hidden.detach().double().requires_grad_()
    expected = nn.functional.cross_entropy(hidden64 @ weight.double().t(), targets, reduction="sum")
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert_close_at_scale(hidden.grad, hidden64.grad)


def test_sliced_head_forward_and_backward_match_fp64():
    generator = torch.Generator().manual_seed(1)
    head = Frozen16bitLinear.wrapping(nn.Linear(32, 97, bias=False, dtype=torch.bfloat16).requires_grad_(False))
    x = torch.randn(3, 7, 32, generator=generator, requires_grad=True)
    upstream = torch.randn(3, 7, 97, generator=generator)
    out = head(x)
    (out * upstream).sum().backward()
    w64 = head.weight.double()
    assert_close_at_scale(out, x.detach().double() @ w64.t())
    assert_close_at_scale(x.grad, upstream.double() @ w64)
    assert out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's dtype wins, as for nn.Linear
        assert head(x).dtype == torch.bfloat16


def test_matmuls_hold_one_upcast_slice_not_the_fp32_weight():
    """The allocator's peak of the upcast matmuls: their output, one fp32 slice and its product; never the fp32 W."""
    from peak_memory import measure_peak_bytes

    weight = torch.randn(1000, 32).to(torch.bfloat16)
    x, g = torch.randn(4, 32), torch.randn(4, 1000)
    slice_bytes = 5 * 32 * 4
    _, peak_t = measure_peak_bytes(lambda: matmul_weight_t(x, weight, torch.float32))
    _, peak = measure_peak_bytes(lambda: matmul_weight(g, weight, torch.float32))
    fp32_weight = 1000 * 32 * 4
    assert 4 * 1000 * 4 + slice_bytes <= peak_t <= 4 * 1000 * 4 + slice_bytes + 4 * 5 * 4 + 1024 < fp32_weight
    assert 4 * 32 * 4 + slice_bytes <= peak <= 4 * 32 * 4 * 2 + slice_bytes + 1024 < fp32_weight


def test_training_a_kept_weight_is_refused():
    embedding = Frozen16bitEmbedding.wrapping(nn.Embedding(10, 4, dtype=torch.bfloat16), torch.float32)
    embedding.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="modules_to_save"):
        embedding(torch.tensor([1, 2]))


@pytest.mark.parametrize("tie", [False, True])
def test_modules_to_save_train_fp32_copies_beside_the_frozen_16bit_originals(tmp_path, tie):
    """QLoRA of a bf16 checkpoint with modules_to_save: fp32 trainable copies holding the exact upcasts, the bf16
    originals frozen (the disabled adapter), gradients equal to an fp32 model's, and merge_and_unload returns the
    checkpoint's bf16 (fp32 on request, then with the trained logits)."""
    _, folder = bf16_checkpoint(tmp_path, tie)
    model, _ = lorafit.load_model(str(folder), device="cpu", quantize="nf4")
    reference = fp32_copy(model)
    base_logits = model(ids()).logits
    config = lorafit.AdapterConfig(r=4, alpha=8, modules_to_save=["embed_tokens", "lm_head"])
    for m in (model, reference):
        torch.manual_seed(0)
        with pytest.warns(lorafit.LorafitWarning) if tie else contextlib.nullcontext():
            lorafit.attach(m, config, warn_scale=False)
        randomize_adapters(m)
    for name in ("model.embed_tokens", "lm_head"):
        wrapper = model.get_submodule(name)
        assert type(wrapper.original_module) in (Frozen16bitEmbedding, Frozen16bitLinear)
        assert wrapper.original_module.weight.dtype == torch.bfloat16 and not wrapper.original_module.weight.requires_grad
        assert wrapper.trained_copy.weight.dtype == torch.float32 and wrapper.trained_copy.weight.requires_grad
        assert torch.equal(wrapper.trained_copy.weight, wrapper.original_module.weight.float())
    x = ids()
    assert "lm_head.trained_copy.weight" in compare_gradients(model, reference, x)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(torch.randn_like(p) * 0.05)
        trained = model(x).logits
        with lorafit.adapters_disabled(model):
            torch.testing.assert_close(model(x).logits, base_logits, rtol=0, atol=0)
        as_fp32 = lorafit.merge_and_unload(copy.deepcopy(model), dtype=torch.float32)
        assert (as_fp32(x).logits - trained).abs().max() <= 1e-5
        merged = lorafit.merge_and_unload(model)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}  # the checkpoint's dtype, one coherent model
    assert type(merged.get_input_embeddings()) is nn.Embedding
    diff = (merged(x).logits.float() - trained).abs().max().item()
    assert diff <= 0.05 * trained.abs().max().item()  # bf16 weights and bf16 compute: ~2^-8 relative per op


def test_merge_of_a_qlora_model_returns_the_checkpoints_16bit_dtype(tmp_path):
    _, folder = bf16_checkpoint(tmp_path, tie=False)
    model, _ = lorafit.load_model(str(folder), device="cpu", quantize="nf4")
    lorafit.attach(model, lorafit.AdapterConfig(r=4, alpha=8), warn_scale=False)
    merged = lorafit.merge_and_unload(copy.deepcopy(model))
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
    assert type(merged.get_output_embeddings()) is nn.Linear
    kept_fp32 = lorafit.merge_and_unload(model, dtype=torch.float32)
    assert kept_fp32.model.layers[0].mlp.down_proj.weight.dtype == torch.float32


@pytest.mark.parametrize("tie", [False, True])
def test_trainable_token_rows_are_fp32_beside_the_frozen_16bit_tables(tmp_path, tie):
    """QLoRA of a bf16 checkpoint with trainable_token_indices (dict form: the untied head's rows too): fp32 rows
    starting at the exact upcasts, gradients equal to an fp32 model's, the bf16 tables bit-identical after a step."""
    _, folder = bf16_checkpoint(tmp_path, tie)
    model, _ = lorafit.load_model(str(folder), device="cpu", quantize="nf4")
    reference = fp32_copy(model)
    tables = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    config = lorafit.AdapterConfig(r=4, alpha=8, trainable_token_indices={"embed_tokens": [3, 9, 41],
                                                                          "lm_head": [3, 9, 41]})
    for m in (model, reference):
        torch.manual_seed(0)
        lorafit.attach(m, config, warn_scale=False)
        randomize_adapters(m)
    rows = model.model.embed_tokens.trainable_tokens_delta
    assert rows.dtype == torch.float32 and torch.equal(rows, tables["model.embed_tokens.weight"][[3, 9, 41]].float())
    assert model.lm_head.owns_delta != tie  # tied: the head follows the embedding's rows
    x = torch.cat([torch.tensor([[3, 9, 41, 3]]), ids()[:1, :7]], dim=1)
    assert "model.embed_tokens.trainable_tokens_delta" in compare_gradients(model, reference, x)
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    after = {n: p for n, p in model.named_parameters() if p.dtype == torch.bfloat16}
    assert {n.replace(".base_layer", "") for n in after} == set(tables)
    assert all(torch.equal(p, tables[n.replace(".base_layer", "")]) for n, p in after.items())
