"""Reward functions of the GRPO arithmetic example (examples/grpo_arithmetic.yaml).

Each gets the prompts, the completions and the data rows' fields (here `answer`), one list entry per
completion, and returns one float per completion. The run sums them: a perfect reply scores 2.
"""

from __future__ import annotations

import re

TAG = re.compile(r"<answer>\s*(-?\d+)\s*</answer>")
ONLY_TAG = re.compile(r"\s*<answer>\s*-?\d+\s*</answer>\s*")


def format_reward(prompts: list[str], completions: list[str], **fields) -> list[float]:
    """1 for a reply that is exactly <answer>N</answer>, 0.5 when such a tag sits inside other text, else 0."""
    return [1.0 if ONLY_TAG.fullmatch(c) else 0.5 if TAG.search(c) else 0.0 for c in completions]


def correct_reward(prompts: list[str], completions: list[str], answer: list[int], **fields) -> list[float]:
    """1 when the first <answer>N</answer> of the reply holds the right result, else 0."""
    found = [TAG.search(c) for c in completions]
    return [float(m is not None and int(m.group(1)) == int(a)) for m, a in zip(found, answer)]
