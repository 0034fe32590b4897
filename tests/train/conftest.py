"""A tiny model saved as a folder, with chat data and a run YAML, for trainer and CLI tests."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import tiny_chat_tokenizer

ROWS = [("Ship two red mugs to Oslo.", '{"item": "mug", "quantity": 2}'),
        ("Send one blue lamp to Rome.", '{"item": "lamp", "quantity": 1}'),
        ("Could five green boxes go to Lima?", '{"item": "box", "quantity": 5}'),
        ("Please deliver three pink cups to Paris.", '{"item": "cup", "quantity": 3}')] * 3


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Llama + ChatML tokenizer saved as a model folder, train/eval files and a run YAML."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny_run")
    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for name, rows in (("train", ROWS), ("eval", ROWS[:4])):
        with open(root / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps({"messages": [{"role": "user", "content": user},
                                                      {"role": "assistant", "content": reply}]}) + "\n" for user, reply in rows)
    (root / "run.yaml").write_text(f"""
model: {root / 'model'}
output_dir: {root / 'out'}
adapter: {{r: 4, alpha: 8, dropout: 0.1}}
data: {{train: {root / 'train.jsonl'}, eval: {root / 'eval.jsonl'}, max_seq_len: 128}}
training: {{max_steps: 6, batch_size: 2, micro_batch_size: 1, lr: 5.0e-3, warmup_steps: 1, save_every: 2,
           keep_checkpoints: 2, seed: 3}}
evaluation: {{every: 3, generation: true, metric: json, max_new_tokens: 8}}
""")
    return root
