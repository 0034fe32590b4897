"""Tiny randomly initialised models built from configs (no downloads), adapter perturbation, and a tiny run folder
(model + data + run.yaml) for trainer and CLI tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

VOCAB = 96


def tiny_config(arch: str):
    """A two-block config of the given architecture, small enough for millisecond forwards."""
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common)  # q/k/v carry biases
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)  # Conv1D layers
    raise ValueError(arch)


def build_tiny(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny random causal LM in eval mode; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype)
    return model.eval()


def build_tied_llama(seed: int = 0):
    """The tiny Llama with one weight shared by the input embeddings and the head (tie_word_embeddings)."""
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


def perturb_trainable(model, seed: int = 5, scale: float = 0.5) -> None:
    """Move every trainable tensor that is no LoRA factor (modules_to_save copies, trained token rows) by noise, so
    that a lost or misplaced one shows in the logits."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad and "lora_" not in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def randomize_adapters(model, seed: int = 3, scale: float = 0.1) -> None:
    """Give every lora_B (and the biases when trained) random values, and scale DoRA magnitudes by 1 + N(0, scale),
    so that comparisons are not trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_lora_b = ".lora_B." in name and name.endswith("weight")  # PEFT: lora_B.default.weight
            if is_lora_b or (param.requires_grad and name.endswith(".bias")):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
            elif ".lora_magnitude_vector" in name:  # ours: <m>.lora_magnitude_vector; PEFT: ...vector.default.weight
                param.mul_(1 + torch.randn(param.shape, generator=generator) * scale)


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|end|>"]
CORPUS = [
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "system user assistant",
    "Hello! How can I help you today?",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke about cats. Cats sleep all day and judge you all night.",
    "Write a short poem about the sea, the waves and the wind.",
    "The quick brown fox jumps over the lazy dog.",
]


def tiny_backend_tokenizer() -> Tokenizer:
    """A byte-level BPE (vocab 400) trained offline on a few sentences, with ChatML special tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def tiny_chat_tokenizer(template: str = SMOLLM2_TEMPLATE, backend: Tokenizer | None = None) -> PreTrainedTokenizerFast:
    """The tiny tokenizer wrapped like SmolLM2's: ChatML template, eos and pad <|im_end|>."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend or tiny_backend_tokenizer(),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = template
    return tokenizer


TINY_RUN_ROWS = [("Ship two red mugs to Oslo.", '{"item": "mug", "quantity": 2}'),
                 ("Send one blue lamp to Rome.", '{"item": "lamp", "quantity": 1}'),
                 ("Could five green boxes go to Lima?", '{"item": "box", "quantity": 5}'),
                 ("Please deliver three pink cups to Paris.", '{"item": "cup", "quantity": 3}')] * 3


def save_tiny_chat_llama(folder: Path, hidden_size: int = 32, head_scale: float = 1.0) -> None:
    """Save a 2-layer GQA Llama (seed 0) with the tiny ChatML tokenizer into `folder`. head_scale > 1 multiplies the
    output head: logits std 0.1 -> 3 at 30, as in a trained model; random init is otherwise nearly uniform, so a small
    adapter could not move sequence log-probs or next-token distributions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_chat_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                                         intermediate_size=2 * hidden_size, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id))
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def write_tiny_run(root: Path) -> Path:
    """Into `root`: a tiny Llama + ChatML tokenizer saved as model/, train.jsonl and eval.jsonl chats and a run.yaml
    (6 steps, checkpoints every 2, generation eval); returns root."""
    save_tiny_chat_llama(root / "model")
    for name, rows in (("train", TINY_RUN_ROWS), ("eval", TINY_RUN_ROWS[:4])):
        with open(root / f"{name}.jsonl", "w") as handle:
            handle.writelines(json.dumps({"messages": [{"role": "user", "content": user},
                                                      {"role": "assistant", "content": reply}]}) + "\n"
                              for user, reply in rows)
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
