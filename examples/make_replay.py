"""Generate self-distillation replay rows: the base model's own greedy replies to general prompts.

Mixed into a narrow training set (the quickstart's order extraction), these rows keep the adapter close to the
base model on everything else: their targets are what the base already says, so fitting them pulls the tuned
model's distribution on general chats back towards the base's (the forward KL that `lorafit forgetting` measures)
instead of teaching anything new.

    OMP_NUM_THREADS=1 python examples/make_replay.py

reads ``data/replay_prompts.jsonl`` (rows ``{"kind", "prompt"}``, written for this file and disjoint from the
forgetting check's own prompts, so that the check still measures held-out behaviour) and writes
``data/general_replay.jsonl``: rows ``{"messages": [user, assistant]}``, in the prompts' order.

- No system message: the chats are generated exactly as the forgetting check asks its prompts (a user turn
  alone, to which SmolLM2's chat template adds its default system prompt), and a row without a system message
  is rendered the same way in training, so each target is trained in the very context it was generated in.
- Only replies that ended on their own are kept (an end-of-turn token before ``--max-new-tokens``): training
  renders every assistant turn followed by its end-of-turn token, so a cut reply would teach the model to stop
  mid-sentence. Empty replies are dropped too.
- Deterministic: greedy decoding of the fp32 model, fixed batches (prompts sorted by length), one output for
  given prompts, model, device and ``--batch-size``. Written atomically.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from lorafit.data.chat import build_prompt_ids
from lorafit.evaluation.generate import end_of_turn_ids, generate_ids
from lorafit.fileio import write_text_atomic
from lorafit.models import load_model

HERE = Path(__file__).resolve().parent
PROMPTS_FILE = HERE / "data" / "replay_prompts.jsonl"
OUT_FILE = HERE / "data" / "general_replay.jsonl"
MODEL = "smollm2-135m"
MAX_NEW_TOKENS = 128
BATCH_SIZE = 16


def read_prompts(path: Path) -> list[str]:
    """The `prompt` field of each row of a JSON-lines file, in file order."""
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line).get("prompt")
        except (json.JSONDecodeError, AttributeError) as err:
            raise SystemExit(f"{path}:{number}: each line must be a JSON object with a 'prompt' field ({err})") from None
        if not isinstance(prompt, str) or not prompt.strip():
            raise SystemExit(f"{path}:{number}: field 'prompt' must be a non-empty string, got {prompt!r}")
        prompts.append(prompt)
    return prompts


def replay_rows(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = MAX_NEW_TOKENS,
                batch_size: int = BATCH_SIZE, progress: bool = True) -> list[dict[str, Any]]:
    """A `{"messages": [user, assistant]}` row for each prompt whose greedy reply ended by itself (its last
    token is an end-of-turn token) and is not empty, in prompt order."""
    chats = [[{"role": "user", "content": prompt}] for prompt in prompts]
    completions = generate_ids(model, tokenizer, [build_prompt_ids(tokenizer, chat) for chat in chats],
                               max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    stops = end_of_turn_ids(model, tokenizer)
    rows = []
    for chat, ids in zip(chats, completions):
        reply = tokenizer.decode(ids, skip_special_tokens=True).strip()  # as generate_responses decodes
        if ids and ids[-1] in stops and reply:
            rows.append({"messages": [*chat, {"role": "assistant", "content": reply}]})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Rows as JSON lines, atomically (a temp file beside `path`, fsynced, renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="model short name or folder (default: %(default)s)")
    parser.add_argument("--prompts", type=Path, default=PROMPTS_FILE, help="JSON lines with a 'prompt' field")
    parser.add_argument("--out", type=Path, default=OUT_FILE, help="output JSON-lines file")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                        help="longest reply; a reply still going at this length is dropped")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    parser.add_argument("--device", default=None, help="default: CUDA when present, else CPU")
    args = parser.parse_args(argv)

    prompts = read_prompts(args.prompts)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device=args.device)
    clock, cpu = time.perf_counter(), time.process_time()
    rows = replay_rows(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    wall, cpu = time.perf_counter() - clock, time.process_time() - cpu
    write_jsonl(args.out, rows)
    print(f"kept {len(rows)} of {len(prompts)} replies (the others reached {args.max_new_tokens} tokens or were "
          f"empty); generation took {wall:.0f} s wall, {cpu:.0f} CPU-seconds on {model.device}; wrote {args.out}")


if __name__ == "__main__":
    main()
