"""Batched generation for evaluation, the CLI and GRPO sampling: left-padded prompts, KV-cached, greedy by default."""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from lorafit.data.chat import build_prompt_ids


@torch.no_grad()
def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    progress: bool = False,
) -> list[list[int]]:
    """Completion token ids for each prompt (token ids), in input order, cut after the first end-of-turn token.

    temperature 0 is greedy; otherwise tokens are drawn from softmax(logits / temperature) restricted to the
    top_p nucleus, with the global torch generator (so a seeded run repeats) and no hidden top-k cut-off.
    """
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch: less padding
    completions: list[list[int]] = [[] for _ in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = end_of_turn_ids(model, tokenizer)
    sampling = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0
                else {"do_sample": False})
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
        # synced_gpus off: transformers turns it on for FSDP-managed models, making every rank run forwards in step
        # with the others; lorafit generates with every weight on each rank (distributed.run_whole), and ranks
        # answer shares of different sizes, so no rank may wait for another here
        out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(stops),
                             synced_gpus=False, **sampling)
        for row, i in enumerate(batch):
            completions[i] = _cut_after_stop(out[row, width:].tolist(), stops)
    model.train(was_training)
    return completions


def end_of_turn_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a reply: the tokenizer's eos and those of the model's generation config."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def _cut_after_stop(tokens: list[int], stops: set[int]) -> list[int]:
    """Keep tokens up to and including the first stop token (what follows is padding)."""
    for position, token in enumerate(tokens):
        if token in stops:
            return tokens[:position + 1]
    return tokens


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
    completions = generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               temperature=temperature, top_p=top_p, progress=progress)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completions]
