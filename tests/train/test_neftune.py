"""NEFTune noise: off in eval mode, uniform with bound alpha/sqrt(L*d) in training, same draws as transformers'
hook, gone after the block."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import build_tiny
from transformers.integrations.neftune import neftune_post_forward_hook

from lorafit.run_config import ConfigError, DataConfig, RunConfig, TrainingConfig, validate
from lorafit.train.neftune import neftune_magnitude, neftune_noise

ALPHA = 5.0


def embeddings_out(model, ids):
    return model.get_input_embeddings()(ids)


@pytest.fixture
def model_and_ids():
    model = build_tiny("llama")  # hidden 32
    ids = torch.randint(0, 96, (8, 48), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_no_noise_in_eval_mode(model_and_ids):
    model, ids = model_and_ids
    clean = embeddings_out(model, ids)
    model.eval()
    with neftune_noise(model, ALPHA):
        assert torch.equal(embeddings_out(model, ids), clean)
        logits = model(ids).logits
    assert torch.equal(logits, model(ids).logits)


def test_noise_is_uniform_with_the_formula_bound(model_and_ids):
    model, ids = model_and_ids
    clean = embeddings_out(model, ids)
    model.train()
    torch.manual_seed(1)
    with neftune_noise(model, ALPHA):
        noise = (embeddings_out(model, ids) - clean).double()
    bound = ALPHA / math.sqrt(48 * 32)
    assert neftune_magnitude(ALPHA, 48, 32) == pytest.approx(bound)
    n = noise.numel()  # 8*48*32 = 12288 draws
    # Uniform(-b, b): every draw within b (+ fp32 rounding of the sum), the extremes reach b to within 0.2%
    # (P(max < 0.998 b) = 0.999^12288 ~ 5e-6), std b/sqrt(3) with relative error sd sqrt(0.8/n)/2 ~ 0.4%:
    # a 2% tolerance is 5 sd; the mean's sd is b/sqrt(3n) ~ 0.005 b, tolerance 0.03 b = 6 sd.
    assert noise.abs().max() <= bound * (1 + 1e-5)
    assert noise.max() >= 0.998 * bound and noise.min() <= -0.998 * bound
    assert noise.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    assert abs(noise.mean().item()) < 0.03 * bound
    assert n == 12288


def test_same_draws_as_transformers_hook(model_and_ids):
    model, ids = model_and_ids
    model.train()
    embeddings = model.get_input_embeddings()
    torch.manual_seed(7)
    with neftune_noise(model, ALPHA):
        ours = embeddings_out(model, ids)
    embeddings.neftune_noise_alpha = ALPHA
    handle = embeddings.register_forward_hook(neftune_post_forward_hook)
    torch.manual_seed(7)
    theirs = embeddings_out(model, ids)
    handle.remove()
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-7)


def test_hook_removed_on_exit_and_on_error(model_and_ids):
    model, ids = model_and_ids
    model.train()
    clean = embeddings_out(model, ids)
    hooks = dict(model.get_input_embeddings()._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"), neftune_noise(model, ALPHA):
        assert len(model.get_input_embeddings()._forward_hooks) == len(hooks) + 1
        raise RuntimeError("boom")
    assert dict(model.get_input_embeddings()._forward_hooks) == hooks
    assert torch.equal(embeddings_out(model, ids), clean)


@pytest.mark.parametrize("alpha", [None, 0.0])
def test_off_values_add_nothing(model_and_ids, alpha):
    model, ids = model_and_ids
    model.train()
    with neftune_noise(model, alpha):
        assert not model.get_input_embeddings()._forward_hooks
        assert torch.equal(embeddings_out(model, ids), model.get_input_embeddings().weight[ids])


@pytest.mark.parametrize("alpha", [-1.0, float("nan"), float("inf")])
def test_bad_alpha(model_and_ids, alpha):
    model, _ = model_and_ids
    with pytest.raises(ValueError, match="neftune_noise_alpha"), neftune_noise(model, alpha):
        pass
    config = RunConfig(model="m", data=DataConfig(train="t.jsonl"), training=TrainingConfig(neftune_noise_alpha=alpha))
    with pytest.raises(ConfigError, match="training.neftune_noise_alpha"):
        validate(config)
