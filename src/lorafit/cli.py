"""`lorafit <command>`: a thin layer over the library; every error ends in one clear line, not a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, RuntimeError, FileNotFoundError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lorafit` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return args.handler(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted; checkpoints already written are kept (resume with --resume).", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"lorafit {args.command}: error: {err}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description="Fast LoRA fine-tuning of transformer language models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="fine-tune a model as a YAML run file says",
                                description="Fine-tune with LoRA as RUN.yaml says; `key.path=value` overrides any field "
                                            "(e.g. training.lr=5e-4 adapter.r=8). The adapter lands in OUTPUT/adapter.")
    train.add_argument("config", help="the run's YAML file (see examples/quickstart.yaml)")
    train.add_argument("overrides", nargs="*", help="overrides such as training.max_steps=50")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.set_defaults(handler=_train)

    gen = commands.add_parser("generate", help="answer prompts with a model (and adapter)",
                              description="Generate replies: one --prompt, or a JSONL file of chats (rows with "
                                          "'messages', without the final assistant turn) written back with 'response'.")
    gen.add_argument("--model", required=True, help="short name, folder, .gguf file or hub id")
    gen.add_argument("--adapter", help="adapter folder (lorafit or PEFT format)")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one user message")
    source.add_argument("--input", help="JSONL file of chats")
    gen.add_argument("--output", help="JSONL file to write (with --input)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--batch-size", type=int, default=32)
    gen.set_defaults(handler=_generate)

    merge = commands.add_parser("merge", help="merge an adapter into its base and save a plain model",
                                description="Fold the adapter into the base weights and save a model (safetensors, "
                                            "config, tokenizer) that transformers loads with from_pretrained.")
    merge.add_argument("--model", required=True, help="short name, folder, .gguf file or hub id of the base")
    merge.add_argument("--adapter", required=True, help="adapter folder")
    merge.add_argument("--out", required=True, help="output folder")
    merge.set_defaults(handler=_merge)
    return parser


def _train(args: argparse.Namespace) -> int:
    from lorafit.run_config import load_run_config
    from lorafit.train.sft import train

    config = load_run_config(args.config, args.overrides)
    result = train(config, resume=args.resume)
    phases = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in result.phases.items())
    print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}; {phases}; results in {result.output_dir}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lorafit.data import read_examples
    from lorafit.evaluation.generate import generate_responses
    from lorafit.fileio import write_text_atomic

    model, tokenizer = _load(args.model, args.adapter)
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   batch_size=args.batch_size)
    if args.prompt is not None:
        print(generate_responses(model, tokenizer, [[{"role": "user", "content": args.prompt}]], **options)[0])
        return 0
    if not args.output:
        raise ValueError("--input needs --output, the JSONL file to write the responses to.")
    examples = read_examples(args.input, require_reply=False)
    chats = [_prompt_messages(e.messages, e.source) for e in examples]
    replies = generate_responses(model, tokenizer, chats, progress=True, **options)
    rows = [{**e.fields, "messages": chat, "response": reply} for e, chat, reply in zip(examples, chats, replies)]
    write_text_atomic(args.output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    print(f"wrote {len(rows)} responses to {args.output}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from lorafit.adapters.model import merge_and_unload
    from lorafit.fileio import atomic_directory

    model, tokenizer = _load(args.model, args.adapter)
    merged = merge_and_unload(model)
    with atomic_directory(Path(args.out)) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"merged model saved to {args.out} (load it with transformers' from_pretrained)")
    return 0


def _load(model_name: str, adapter: str | None):
    from lorafit.adapters.io import load_adapter
    from lorafit.models import load_model

    model, tokenizer = load_model(model_name)
    if adapter:
        load_adapter(model, adapter)
    return model, tokenizer


def _prompt_messages(messages: list[dict] | None, source: str) -> list[dict]:
    """The chat to answer: rows may carry a final assistant turn (a reference), which is dropped."""
    if not messages:
        raise ValueError(f"{source}: generation needs rows with 'messages' (a chat), not plain text.")
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


if __name__ == "__main__":
    sys.exit(main())
