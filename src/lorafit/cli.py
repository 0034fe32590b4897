"""`lorafit <command>`: a thin layer over the library; a user error ends in one clear line, a bug in its traceback."""

from __future__ import annotations

import argparse
import errno
import json
import sys
import traceback
from pathlib import Path

from lorafit.errors import UserError

# What the CLI answers with one line (exit 2); every other exception is a bug in lorafit and keeps its traceback.
# - UserError: lorafit's own type for bad input; its message names the file/field/value and the fix.
# - OSError for paths and the disk (missing file, no permission, a file where a folder is expected or the reverse,
#   disk full, read-only file system): the environment, not lorafit, is wrong, and the message names the path.
# - yaml.YAMLError: lorafit parses only YAML a person wrote or may have edited (run files, key=value overrides,
#   a run's config.yaml) and writes YAML only through yaml.safe_dump, whose output always parses.
PATH_ERRORS: tuple[type[OSError], ...] = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
                                          NotADirectoryError)
DISK_ERRNOS = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT", "EROFS") if hasattr(errno, name)}


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
    except Exception as err:  # noqa: BLE001 - sorted into user errors (one line) and bugs (traceback) below
        if not is_user_error(err):
            traceback.print_exc()
            print(f"lorafit {args.command}: internal error ({type(err).__name__}): this is a bug in lorafit, not in "
                  "your input; please report it with the traceback above.", file=sys.stderr)
            return 1
        print(f"lorafit {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2


def is_user_error(err: BaseException) -> bool:
    """Whether `err` describes a mistake the user can fix (see the comment above PATH_ERRORS)."""
    import yaml

    return (isinstance(err, (UserError, *PATH_ERRORS, yaml.YAMLError))
            or (isinstance(err, OSError) and err.errno in DISK_ERRNOS))


def one_line(err: BaseException) -> str:
    """The error's message on one line (YAML parser messages span several)."""
    return " ".join(str(err).split())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description="Fast LoRA fine-tuning of transformer language models.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="fine-tune a model as a YAML run file says",
                                description="Fine-tune with LoRA as RUN.yaml says; `key.path=value` overrides any field "
                                            "(e.g. training.lr=5e-4 adapter.r=8). The adapter lands in OUTPUT/adapter.")
    train.add_argument("config", help="the run's YAML file (see examples/quickstart.yaml)")
    train.add_argument("overrides", nargs="*", help="overrides such as training.max_steps=50")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    train.add_argument("--trust-checkpoint", action="store_true",
                       help="with --resume: also read a pickled checkpoint of an earlier lorafit (trainer_state.pt); "
                            "a pickle can run code, so only for checkpoints you wrote yourself")
    train.add_argument("--overwrite", action="store_true",
                       help="replace the previous run in output_dir (deletes lorafit's run files there, nothing else)")
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

    export = commands.add_parser("export", help="export to GGUF for llama.cpp / Ollama (merged model or adapter)",
                                 description="--gguf: merge the adapter in fp32 and write one GGUF file (f32, f16, bf16, "
                                             "q8_0 or q4_0) with the tokenizer and chat template, plus an Ollama "
                                             "Modelfile beside it. --gguf-adapter: the LoRA adapter alone as llama.cpp's "
                                             "adapter GGUF (llama-cli --lora, Ollama ADAPTER).")
    export.add_argument("--model", required=True, help="short name, folder, .gguf file or hub id of the base")
    export.add_argument("--adapter", help="adapter folder (required with --gguf-adapter)")
    output = export.add_mutually_exclusive_group(required=True)
    output.add_argument("--gguf", help="merged model file to write, e.g. out/model.gguf")
    output.add_argument("--gguf-adapter", help="adapter file to write, e.g. out/adapter.gguf")
    export.add_argument("--type", help="with --gguf: f32, f16, bf16, q8_0 (default) or q4_0")
    export.set_defaults(handler=_export)

    check = commands.add_parser("check", help="check a run file and audit its data before training",
                                description="Config checks (effective scale, rsLoRA, lr x scale, targets, 4-bit "
                                            "without LoftQ) and a dataset audit (lengths, truncation, duplicates, "
                                            "tiny replies, train/eval overlap); no weights are loaded.")
    check.add_argument("config", help="the run's YAML file")
    check.add_argument("overrides", nargs="*", help="overrides such as adapter.r=64")
    check.add_argument("--previous", help="a previous run folder whose diagnosis informs the advice")
    check.set_defaults(handler=_check)

    diagnose = commands.add_parser("diagnose", help="diagnose a run's loss curves",
                                   description="Read RUN_DIR/metrics.jsonl (and config.yaml when present) and report "
                                               "early_plateau, sluggish_descent, divergent_validation, "
                                               "quantization_plateau, loss_spike, nan or healthy, with evidence and advice.")
    diagnose.add_argument("run_dir")
    diagnose.add_argument("--baseline", help="another run to compare with (e.g. lower rank, or 16-bit for a 4-bit run)")
    diagnose.add_argument("--json", action="store_true", help="print JSON: {\"findings\": [...]}")
    diagnose.set_defaults(handler=_diagnose)

    report = commands.add_parser("report", help="(re)build a run's report.html, optionally overlaying other runs",
                                 description="Write RUN_DIR/diagnosis.json (the loss-curve diagnosis, for methods whose "
                                             "loss is a learning curve), RUN_DIR/report.html (self-contained, plots "
                                             "embedded) and the PNGs in RUN_DIR/report/: curves, adapter update norms "
                                             "per layer, config, diagnosis, before/after evaluation.")
    report.add_argument("run_dir")
    report.add_argument("--compare", nargs="+", default=[], metavar="RUN", help="runs to overlay")
    report.set_defaults(handler=_report)

    recommend = commands.add_parser("recommend", help="print a starting adapter + training config with reasons",
                                    description="A ready-to-run YAML adapter and training section for a model, data "
                                                "size and domain shift, each choice with its reason.")
    recommend.add_argument("--model", required=True, help="short name, folder/config.json or .gguf file")
    recommend.add_argument("--examples", type=int, required=True, help="number of training examples")
    recommend.add_argument("--shift", choices=("narrow", "moderate", "strong"), default="moderate",
                           help="how far the task is from what the model already does")
    recommend.add_argument("--memory-gb", type=float, help="memory budget; switches to a 4-bit base when 16-bit does not fit")
    recommend.set_defaults(handler=_recommend)

    memory = commands.add_parser("estimate-memory", help="estimate training memory from a model's config alone",
                                 description="Weights, adapters, gradients, optimizer state, activations, logits and temporaries "
                                             "of a training step, from config.json or a GGUF header (no weights loaded).")
    memory.add_argument("--model", required=True, help="short name, folder/config.json or .gguf file")
    memory.add_argument("--method", choices=("full", "lora", "qlora"), default="lora")
    memory.add_argument("--r", type=int, default=16)
    memory.add_argument("--batch", type=int, default=1)
    memory.add_argument("--seq", type=int, default=512)
    memory.add_argument("--grad-checkpointing", action="store_true")
    memory.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    memory.add_argument("--optimizer", choices=("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd"), default="adamw")
    memory.add_argument("--gpus", type=int, default=1, help="processes (GPUs) the run uses; the estimate is per process")
    memory.add_argument("--strategy", choices=("ddp", "fsdp"), default="ddp", help="ddp replicates, fsdp shards N ways")
    memory.add_argument("--modules-to-save", nargs="+", default=None, metavar="NAME",
                        help="modules trained in full (adapter.modules_to_save), e.g. embed_tokens lm_head")
    memory.add_argument("--trainable-tokens", type=int, default=0, metavar="ROWS",
                        help="rows of the input embeddings trained (adapter.trainable_token_indices)")
    memory.add_argument("--trainable-head-tokens", type=int, default=0, metavar="ROWS",
                        help="rows of an untied output head trained on their own")
    memory.set_defaults(handler=_estimate_memory)

    evaluate = commands.add_parser("eval", help="score a model (and adapter) on a chat eval set",
                                   description="Greedy replies to each chat of FILE (its final assistant turn is the "
                                               "reference), scored by the metric; prints accuracy +- its binomial "
                                               "standard error. No training.")
    evaluate.add_argument("--model", required=True, help="short name, folder, .gguf file or hub id")
    evaluate.add_argument("--adapter", help="adapter folder (lorafit or PEFT format)")
    evaluate.add_argument("--data", required=True, help="JSONL/JSON/CSV chats ending with the reference answer")
    evaluate.add_argument("--metric", choices=("exact", "json", "contains"), default="exact")
    evaluate.add_argument("--limit", type=int, help="score only the first N rows")
    evaluate.add_argument("--batch-size", type=int, default=32)
    evaluate.add_argument("--max-new-tokens", type=int, default=64)
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.set_defaults(handler=_eval)

    forgetting = commands.add_parser("forgetting", help="how much an adapter changes the model on general inputs",
                                     description="Base (adapter off) vs adapter on lorafit's shipped general prompts "
                                                 "and text: mean token KL(base || tuned) on the base's greedy answers, "
                                                 "perplexity ratio, share of changed answers; warns above thresholds.")
    forgetting.add_argument("--model", required=True, help="short name, folder, .gguf file or hub id of the base")
    forgetting.add_argument("--adapter", required=True, help="adapter folder")
    forgetting.add_argument("--limit", type=int, default=None,
                            help="number of general prompts, of 150 (default: two of each kind)")
    forgetting.add_argument("--max-new-tokens", type=int, default=None,
                            help="answer length in tokens (default: forgetting.DEFAULT_MAX_NEW_TOKENS)")
    forgetting.add_argument("--json", action="store_true", help="print the result as JSON")
    forgetting.set_defaults(handler=_forgetting)
    return parser


def _train(args: argparse.Namespace) -> int:
    from lorafit import distributed
    from lorafit.run_config import load_run_config
    from lorafit.run_dir import RunDir
    from lorafit.train import dpo, grpo, sft

    config = load_run_config(args.config, args.overrides)
    trainer = {"sft": sft, "grpo": grpo, "dpo": dpo}[config.method]
    try:
        result = trainer.train(config, resume=args.resume, trust_checkpoint=args.trust_checkpoint,
                               overwrite=args.overwrite)
    finally:
        RunDir(config.output_dir).release()  # a run that failed frees its folder (only a lock of this process)
    phases = ", ".join(f"{k.removesuffix('_s')} {v:.1f}s" for k, v in result.phases.items())
    distributed.print_main(f"done: {result.steps} steps, final loss {result.final_loss:.4f}; {phases}; "
                           f"results in {result.output_dir}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from lorafit.diagnose.checks import check_run_config, format_checks
    from lorafit.diagnose.curves import diagnose_run
    from lorafit.diagnose.dataset_audit import audit_dataset
    from lorafit.models import load_tokenizer
    from lorafit.run_config import load_run_config

    config = load_run_config(args.config, args.overrides)
    previous = diagnose_run(args.previous).to_json()["findings"] if args.previous else None
    print(format_checks(check_run_config(config, previous)))
    print(audit_dataset(config, load_tokenizer(config.model)).to_text())
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    from lorafit.diagnose.curves import diagnose_report

    text, as_json = diagnose_report(args.run_dir, args.baseline)
    print(as_json if args.json else text)
    return 0


def _report(args: argparse.Namespace) -> int:
    from lorafit.finish import finish_run

    finish_run(args.run_dir, compare=args.compare)
    return 0


def _recommend(args: argparse.Namespace) -> int:
    from lorafit.diagnose.recommend import recommend

    print(recommend(args.model, args.examples, shift=args.shift, memory_gb=args.memory_gb).to_yaml())
    return 0


def _estimate_memory(args: argparse.Namespace) -> int:
    from lorafit.diagnose.memory import estimate_memory

    estimate = estimate_memory(args.model, method=args.method, r=args.r, batch=args.batch, seq=args.seq,
                               grad_checkpointing=args.grad_checkpointing, precision=args.precision,
                               optimizer=args.optimizer, gpus=args.gpus, strategy=args.strategy,
                               modules_to_save=args.modules_to_save, trainable_tokens=args.trainable_tokens,
                               trainable_head_tokens=args.trainable_head_tokens)
    print(estimate.to_text())
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lorafit.data import read_examples
    from lorafit.evaluation.generate import generate_responses
    from lorafit.fileio import write_text_atomic

    model, tokenizer = _load(args.model, args.adapter)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "batch_size": args.batch_size}
    if args.prompt is not None:
        print(generate_responses(model, tokenizer, [[{"role": "user", "content": args.prompt}]], **options)[0])
        return 0
    if not args.output:
        raise UserError("--input needs --output, the JSONL file to write the responses to.")
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


def _export(args: argparse.Namespace) -> int:
    from lorafit.export import (
        export_adapter_gguf,
        export_model_gguf,
        source_gguf,
        write_modelfile,
    )
    from lorafit.export.gguf_file import check_output_path
    from lorafit.export.gguf_types import check_export_type

    if args.gguf_adapter:
        if args.type:
            raise UserError("--type applies to --gguf only; adapter tensors are written in F32.")
        if not args.adapter:
            raise UserError("--gguf-adapter needs --adapter DIR, the adapter to export.")
        check_output_path(args.gguf_adapter, "--gguf-adapter")
        model, _ = _load(args.model, args.adapter)
        print(export_adapter_gguf(model, args.gguf_adapter).summary())
        return 0
    export_type = args.type or "q8_0"
    check_export_type(export_type)
    check_output_path(args.gguf, "--gguf")
    model, tokenizer = _load(args.model, args.adapter)
    result = export_model_gguf(model, tokenizer, args.gguf, export_type, tokenizer_gguf=source_gguf(args.model),
                               name=Path(args.model).stem)
    print(result.summary())
    print(f"wrote {write_modelfile(args.gguf, tokenizer)} (ollama create NAME -f it)")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lorafit.evaluation.eval_sets import describe, evaluate_set, read_eval_set

    examples = read_eval_set(args.data, args.limit)  # a bad file fails before the model loads
    model, tokenizer = _load(args.model, args.adapter)
    result = evaluate_set(model, tokenizer, examples, args.metric, max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size, progress=True)
    print(json.dumps(result, ensure_ascii=False) if args.json else f"{args.data}: {describe(result)}")
    return 0


def _forgetting(args: argparse.Namespace) -> int:
    from lorafit.evaluation.forgetting import (
        DEFAULT_LIMIT,
        DEFAULT_MAX_NEW_TOKENS,
        forgetting_check,
        format_forgetting,
    )

    limit = DEFAULT_LIMIT if args.limit is None else args.limit
    if limit <= 0:
        raise UserError(f"--limit={limit} must be positive (the shipped set has 150 prompts).")
    model, tokenizer = _load(args.model, args.adapter)
    result = forgetting_check(model, tokenizer, limit=limit, progress=True,
                              max_new_tokens=args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS)
    print(json.dumps(result, ensure_ascii=False) if args.json else format_forgetting(result))
    return 0


def _load(model_name: str, adapter: str | None):
    from lorafit.adapters.io import load_adapter, read_adapter_tokenizer
    from lorafit.models import load_model

    model, tokenizer = load_model(model_name)
    if adapter:
        load_adapter(model, adapter)
        tokenizer = read_adapter_tokenizer(adapter) or tokenizer  # a run that added tokens saved its tokenizer
    return model, tokenizer


def _prompt_messages(messages: list[dict] | None, source: str) -> list[dict]:
    """The chat to answer: rows may carry a final assistant turn (a reference), which is dropped."""
    if not messages:
        raise UserError(f"{source}: generation needs rows with 'messages' (a chat), not plain text.")
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


if __name__ == "__main__":
    sys.exit(main())
