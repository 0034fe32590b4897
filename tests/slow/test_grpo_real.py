"""GRPO on the real SmolLM2-135M: the training layout reproduces the sampler's log-probs; one step's time split."""

from __future__ import annotations

import copy
import time

import pytest
import torch

import lorafit
from lorafit.data.chat import build_prompt_ids
from lorafit.distributed import Runner
from lorafit.run_config import GRPOConfig
from lorafit.train.grpo import (
    Prompt,
    Samples,
    completion_logprobs,
    reference_logprobs,
    sequence_batch,
    update_step,
)

pytestmark = pytest.mark.slow

CHATS = [[{"role": "system", "content": "Give only the result, as <answer>N</answer>."},
          {"role": "user", "content": "What is 47 + 38?"}],
         [{"role": "user", "content": "Name a colour."}]]  # default system prompt: a prompt of another length


def test_sampled_logprobs_match_the_training_layout_and_a_step_runs(smollm2):
    base, tokenizer = smollm2
    model = lorafit.attach(copy.deepcopy(base), lorafit.AdapterConfig(r=16, alpha=32))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lorafit.adapters.model.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.01)
    prompts = [build_prompt_ids(tokenizer, chat) for chat in CHATS]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=True,
                         temperature=0.9, top_k=0, pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    sampled = torch.log_softmax(torch.stack(out.logits, 1) / 0.9, -1).gather(2, out.sequences[:, width:, None])[..., 0]
    samples = Samples([Prompt("", p, "", {}) for p in prompts], out.sequences[:, width:].tolist(), ["", ""], {},
                      torch.zeros(2))
    batch = sequence_batch(samples, torch.tensor([1.0, -1.0]), 0, 2, pad, model.device)
    with torch.no_grad():
        ours = completion_logprobs(model, batch, 0.9)
    diff = (ours - sampled.reshape(-1)).abs().max().item()
    print(f"SmolLM2: training-layout vs sampler log-prob max diff {diff:.2e}")
    assert diff < 3e-4  # fp32 through 30 blocks, two padding layouts: measured 3e-5 (summation order)

    clock = time.perf_counter()
    refs = [reference_logprobs(model, batch, 0.9)]
    reference_s = time.perf_counter() - clock
    clock = time.perf_counter()
    stats = update_step(Runner(model), [batch], [None], refs, GRPOConfig(), use_bf16=False)
    print(f"SmolLM2 GRPO pieces for 2 x ~{batch['input_ids'].shape[1]} tokens: reference {reference_s:.2f}s, "
          f"forward+backward {time.perf_counter() - clock:.2f}s; kl {stats['kl']:.4f}")
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert stats["kl"] > 0 and all(torch.isfinite(g).all() for g in grads) and any(g.abs().max() > 0 for g in grads)
