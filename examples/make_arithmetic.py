"""Generate the GRPO arithmetic example: two-digit additions and subtractions, answered as <answer>N</answer>.

GRPO rows are prompts plus the correct `answer`, which examples/arithmetic_rewards.py reads:
    {"messages": [{"role": "system", ...}, {"role": "user", "content": "What is 47 + 38?"}], "answer": 85}
SFT rows (a handful, for the warm start that teaches the answer format) end with the formatted reply.
The output is deterministic for a given --seed, and no question appears in two files.

    python examples/make_arithmetic.py --seed 0 --train 1000 --eval 100 --sft 32
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lorafit.fileio import write_text_atomic

SYSTEM_PROMPT = "Give only the result, as <answer>N</answer>."
LOW, HIGH = 10, 99  # two-digit operands

Problem = tuple[int, str, int]  # (a, "+" or "-", b); subtraction has a >= b, so results are never negative


def result(problem: Problem) -> int:
    a, op, b = problem
    return a + b if op == "+" else a - b


def prompt_row(problem: Problem) -> dict:
    """A GRPO row: the chat up to the question, and the answer the correctness reward checks."""
    a, op, b = problem
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": f"What is {a} {op} {b}?"}]
    return {"messages": messages, "answer": result(problem)}


def sft_row(problem: Problem) -> dict:
    """An SFT row: the same chat with the reply in the required format."""
    row = prompt_row(problem)
    return {"messages": row["messages"] + [{"role": "assistant", "content": f"<answer>{row['answer']}</answer>"}]}


def draw(rng: random.Random, n: int, seen: set[Problem]) -> list[Problem]:
    """`n` problems not in `seen` (which is updated), half additions and half subtractions on average."""
    problems: list[Problem] = []
    while len(problems) < n:
        a, b, op = rng.randint(LOW, HIGH), rng.randint(LOW, HIGH), rng.choice("+-")
        problem = (max(a, b), op, min(a, b)) if op == "-" else (a, op, b)
        if problem not in seen:
            seen.add(problem)
            problems.append(problem)
    return problems


def generate(seed: int, n_train: int, n_eval: int, n_sft: int) -> tuple[list[dict], list[dict], list[dict]]:
    """(GRPO train rows, held-out eval rows, SFT rows), pairwise disjoint in questions."""
    rng = random.Random(seed)
    seen: set[Problem] = set()
    eval_rows = [prompt_row(p) for p in draw(rng, n_eval, seen)]
    sft_rows = [sft_row(p) for p in draw(rng, n_sft, seen)]
    train_rows = [prompt_row(p) for p in draw(rng, n_train, seen)]
    return train_rows, eval_rows, sft_rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=1000, help="GRPO prompts")
    parser.add_argument("--eval", type=int, default=100, help="held-out prompts")
    parser.add_argument("--sft", type=int, default=32, help="formatted examples for the SFT warm start")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "data")
    args = parser.parse_args(argv)
    train_rows, eval_rows, sft_rows = generate(args.seed, args.train, args.eval, args.sft)
    for name, rows in (("train", train_rows), ("eval", eval_rows), ("sft", sft_rows)):
        write_jsonl(args.out_dir / f"arithmetic_{name}.jsonl", rows)
    print(f"wrote {len(train_rows)} train, {len(eval_rows)} eval and {len(sft_rows)} sft rows to {args.out_dir}")


if __name__ == "__main__":
    main()
