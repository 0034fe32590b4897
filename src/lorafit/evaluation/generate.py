"""Batched generation for evaluation and the CLI: left-padded prompts, KV-cached, greedy by default."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from lorafit.data.chat import build_prompt_ids


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    chats: list[list[dict[str, Any]]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    progress: bool = False,
) -> list[str]:
    """The model's reply to each chat (a list of messages without the final assistant turn), in input order."""
    prompts = [build_prompt_ids(tokenizer, chat) for chat in chats]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    replies: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    was_training = model.training
    model.eval()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generating", disable=not progress, leave=False):
        width = max(len(prompts[i]) for i in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]):] = 1
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
        for row, i in enumerate(batch):
            replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    model.train(was_training)
    return replies
