"""Adapter update norms ||s·B·A||_F from a saved adapter: fp64 math, PEFT's own delta weights, bad folders."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import build_tiny, randomize_adapters

from lorafit import AdapterConfig, AdapterFileError, attach, save_adapter
from lorafit.adapters.model import lora_layers
from lorafit.report import adapter_update_norms

# per-module (r, alpha) written out by hand: the reference for rank_pattern / alpha_pattern
RANK, ALPHA = 4, 8
PATTERN_RANK = {"q_proj": 2}
PATTERN_ALPHA = {"v_proj": 3.0}


def saved_adapter(tmp_path, arch: str = "llama", use_rslora: bool = False):
    model = build_tiny(arch)
    config = AdapterConfig(r=RANK, alpha=ALPHA, use_rslora=use_rslora, target_modules="all-linear",
                           rank_pattern=dict(PATTERN_RANK) if arch == "llama" else {},
                           alpha_pattern=dict(PATTERN_ALPHA) if arch == "llama" else {})
    attach(model, config, warn_scale=False)
    randomize_adapters(model, scale=0.3)
    return model, save_adapter(model, tmp_path / f"adapter_{arch}")


def expected_norms(model, use_rslora: bool) -> dict[str, float]:
    """||s·B·A||_F with the full out×in product in float64 and s from the formula."""
    result = {}
    for name, layer in lora_layers(model).items():
        leaf = name.rsplit(".", 1)[-1]
        r, alpha = PATTERN_RANK.get(leaf, RANK), PATTERN_ALPHA.get(leaf, ALPHA)
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        a, b = layer.lora_A.weight.detach().double(), layer.lora_B.weight.detach().double()
        assert a.shape[0] == r
        result[name] = torch.linalg.norm(scale * (b @ a)).item()
    return result


@pytest.mark.parametrize("use_rslora", [False, True])
def test_norms_match_fp64_products_with_per_module_rank_and_alpha(tmp_path, use_rslora):
    model, path = saved_adapter(tmp_path, use_rslora=use_rslora)
    norms = {n.module: n for n in adapter_update_norms(path)}
    expected = expected_norms(model, use_rslora)
    assert set(norms) == set(expected) and len(norms) == 14  # 2 blocks x 7 linear layers
    for name, value in expected.items():
        # the Gram-matrix route and the full product agree to fp64 rounding (~1e-15 relative)
        assert norms[name].norm == pytest.approx(value, rel=1e-12)
    q = norms["model.layers.1.self_attn.q_proj"]
    assert (q.layer, q.kind, q.rank, q.scale) == (1, "self_attn.q_proj", 2, 8 / math.sqrt(2) if use_rslora else 4.0)


def test_norms_match_peft_delta_weights(tmp_path):
    peft = pytest.importorskip("peft")
    _, path = saved_adapter(tmp_path, arch="gpt2")  # Conv1D layers: PEFT transposes the delta, the norm is the same
    reference = peft.PeftModel.from_pretrained(build_tiny("gpt2"), str(path))
    deltas = {name.removeprefix("base_model.model."): torch.linalg.norm(module.get_delta_weight("default")).item()
              for name, module in reference.named_modules() if isinstance(module, peft.tuners.lora.LoraLayer)}
    norms = {n.module: n for n in adapter_update_norms(path)}
    assert set(norms) == set(deltas)
    for name, value in deltas.items():
        assert norms[name].norm == pytest.approx(value, rel=1e-5)  # PEFT multiplies in float32
    kinds = {n.kind for n in norms.values()}
    assert {"attn.c_proj", "mlp.c_proj", "attn.c_attn", "mlp.c_fc"} <= kinds  # the block index splits the names


def test_a_config_that_does_not_fit_the_weights_is_an_error(tmp_path):
    _, path = saved_adapter(tmp_path)
    config = json.loads((path / "adapter_config.json").read_text())
    config["rank_pattern"] = {}
    (path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterFileError, match="q_proj has A \\(2, 32\\)"):
        adapter_update_norms(path)


def test_missing_or_corrupt_weights_are_errors(tmp_path):
    _, path = saved_adapter(tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterFileError, match="cannot be read"):
        adapter_update_norms(path)
    with pytest.raises(AdapterFileError, match="does not exist"):
        adapter_update_norms(tmp_path / "nowhere")
