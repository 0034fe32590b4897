"""A run with data.added_tokens and trainable token rows: the adapter folder carries the grown tokenizer, lorafit
and PEFT 0.21 load it with the same logits (1e-5), only the listed rows of the tables move; and an adapter PEFT
saved after resizing (with its whole tables) loads in lorafit."""

from __future__ import annotations

import dataclasses

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import perturb_trainable, randomize_adapters, save_tiny_chat_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorafit
from lorafit.run_config import load_run_config
from lorafit.train import sft

NEW = ["<tool_call>", "</tool_call>"]
TOL = 1e-5


def test_run_with_added_tokens_loads_in_lorafit_and_peft(tiny_run):
    out = tiny_run / "out_tokens"
    indices = "{embed_tokens: ['<tool_call>', '</tool_call>', '{'], lm_head: ['<tool_call>', '</tool_call>']}"
    config = load_run_config(tiny_run / "run.yaml", [f"output_dir={out}", "training.max_steps=2",
                                                     "training.save_every=0", "evaluation.every=0",
                                                     "evaluation.generation=false", f"data.added_tokens={NEW}",
                                                     f"adapter.trainable_token_indices={indices}"])
    sft.train(config)
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    new_ids = tokenizer.convert_tokens_to_ids(NEW)
    assert len(tokenizer) == new_ids[-1] + 1 and new_ids[0] == len(AutoTokenizer.from_pretrained(tiny_run / "model"))

    ours = lorafit.load_adapter(lorafit.load_model(str(tiny_run / "model"))[0], out / "adapter")
    assert ours.model.embed_tokens.weight.shape[0] == len(tokenizer)  # grown from the folder's tokenizer
    base = AutoModelForCausalLM.from_pretrained(tiny_run / "model")
    base.resize_token_embeddings(len(tokenizer))  # PEFT's user: random new rows, all replaced by the saved rows
    theirs = PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.tensor([tokenizer("Ship <tool_call>two mugs</tool_call> {").input_ids])
    assert set(new_ids) <= set(ids[0].tolist())
    diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    print(f"run with added tokens: lorafit vs PEFT max logit diff {diff:.2e}")
    assert diff <= TOL

    start = lorafit.load_model(str(tiny_run / "model"))[0]
    lorafit.models.vocabulary.resize_vocabulary(start, len(tokenizer))  # the run's placeholder start
    rows = ours.model.embed_tokens.delta.detach()
    assert not torch.equal(rows, start.model.embed_tokens.weight[ours.model.embed_tokens.token_indices])  # trained
    merged = lorafit.merge_and_unload(ours)
    embed_changed = (merged.model.embed_tokens.weight != start.model.embed_tokens.weight).any(dim=1)
    assert set(embed_changed.nonzero().flatten().tolist()) <= set(tokenizer.convert_tokens_to_ids([*NEW, "{"]))
    head_changed = (merged.lm_head.weight != start.lm_head.weight).any(dim=1).nonzero().flatten().tolist()
    assert set(head_changed) <= set(new_ids)

    # a run warm-started from that adapter inherits its tokens (same ids) and saves the tokenizer again
    follow_up = dataclasses.replace(config, init_adapter=str(out / "adapter"), adapter=lorafit.AdapterConfig(),
                                    data=dataclasses.replace(config.data, added_tokens=[]),
                                    output_dir=str(tiny_run / "out_tokens_2"))
    sft.train(follow_up)
    again = AutoTokenizer.from_pretrained(tiny_run / "out_tokens_2" / "adapter")
    assert again.convert_tokens_to_ids(NEW) == new_ids and len(again) == len(tokenizer)


def test_peft_adapter_of_a_resized_model_loads_in_lorafit(tmp_path):
    """PEFT saves the whole tables when the vocabulary grew (save_embedding_layers 'auto'): here the input rows by
    trainable tokens and the untied head, untouched by the adapter but resized, as `lm_head.weight`."""
    save_tiny_chat_llama(tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    tokenizer.add_tokens(NEW)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model.resize_token_embeddings(len(tokenizer))  # random new rows in both tables
    new_ids = tokenizer.convert_tokens_to_ids(NEW)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                  trainable_token_indices=new_ids))
    randomize_adapters(peft_model)
    perturb_trainable(peft_model)
    peft_model.save_pretrained(tmp_path / "peft")
    tokenizer.save_pretrained(tmp_path / "peft")
    ids = torch.tensor([[1, 5, new_ids[0], 7, new_ids[1]]])
    theirs = peft_model.eval()(ids).logits

    ours = lorafit.load_adapter(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    diff = (ours(ids).logits - theirs).abs().max().item()
    print(f"PEFT (resized, whole tables saved) -> lorafit max logit diff {diff:.2e}")
    assert diff <= TOL
