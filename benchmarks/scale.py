"""QLoRA at 1B-8B scale on this machine, measured: lorafit vs transformers + PEFT + bitsandbytes.

    python benchmarks/make_checkpoint.py --shape llama-3.2-1b --out /tmp/lorafit-bench/llama-3.2-1b
    python benchmarks/scale.py --model /tmp/lorafit-bench/llama-3.2-1b --optimizers adamw adamw_8bit --peft

Settings (the issue's): NF4 + double quantisation, LoRA r 16 alpha 32 on all block linears, batch 1 x 256
tokens (packed), gradient checkpointing, fp32 compute, 2 optimiser steps, then the adapter is saved.
Each measurement runs in a fresh process (benchmarks.common.run_worker):
- baseline: `import lorafit` (torch + transformers): the RSS every process pays before any model;
- load (--load-only): lorafit.load_model(..., quantize="nf4"): peak RSS of the load, RSS after it;
- train: `lorafit train` (sft.train) of the same folder; the load inside it is measured as the load worker
  measures it (peak RSS of the load_model call, RSS after it), so an 8B checkpoint is loaded once per optimizer,
  not once more for the load alone; its metrics rows carry each step's peak RSS (the first window opens after
  the load), the summary its phase times; one run per optimizer;
- peft: the same recipe in transformers + PEFT + bitsandbytes (BitsAndBytesConfig NF4 + double quant,
  prepare_model_for_kbit_training, get_peft_model, torch AdamW, the stock loss): peak RSS of load and of
  the 2 steps, s/step; or the error where it fails.
The estimate is `estimate_memory` for the same settings; it counts the step's bytes, so it is compared
with the training peak minus the baseline process (both printed). Results: benchmarks/results/scale_<name>.json/.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lorafit.device import peak_rss_bytes, reset_peak_rss  # noqa: E402
from lorafit.fileio import write_text_atomic  # noqa: E402
from common import (  # noqa: E402
    GB,
    RESULTS_DIR,
    current_rss_bytes,
    emit_phase,
    emit_worker_result,
    machine_info,
    markdown_table,
    run_worker,
    save_results,
)

R, ALPHA, SEQ, STEPS, LR = 16, 32, 256, 2, 1e-4
SENTENCE = "The quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire. "


def write_data(folder: Path) -> Path:
    """Chat rows long enough that every packed 256-token row is full."""
    path = folder / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Story {i}: tell me more."},
                          {"role": "assistant", "content": SENTENCE * 12}]} for i in range(16)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def worker_baseline() -> dict[str, Any]:
    import lorafit  # noqa: F401 - the import is what is measured

    return {"rss": current_rss_bytes(), "peak": peak_rss_bytes()}


def worker_load(model: str) -> dict[str, Any]:
    import lorafit
    from lorafit.device import return_freed_host_memory

    return_freed_host_memory()  # as `lorafit train` with training.release_host_memory does before it loads
    measured: dict[str, Any] = {}
    loaded, _ = measured_load(lorafit.load_model, measured)(model, quantize="nf4", device="cpu")
    return {**measured, "parameters": sum(p.numel() for p in loaded.parameters())}


def measured_load(load_model: Any, into: dict[str, Any]) -> Any:
    """load_model wrapped so that each call records its RSS before, its peak, the RSS after and its seconds."""

    def load(*args: Any, **kwargs: Any) -> Any:
        emit_phase("load")
        into["before"] = current_rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        result = load_model(*args, **kwargs)
        into.update(seconds=time.perf_counter() - start, peak=peak_rss_bytes(), after=current_rss_bytes())
        emit_phase("train")
        return result

    return load


def worker_train(model: str, optimizer: str, out: Path) -> dict[str, Any]:
    from lorafit.run_config import load_run_config
    from lorafit.run_dir import read_metrics
    from lorafit.train import loop, sft

    data = write_data(out.parent)
    config_path = out.parent / f"run-{optimizer}.yaml"
    config_path.write_text(f"""
model: {model}
output_dir: {out}
quantize: nf4
double_quant: true
adapter: {{r: {R}, alpha: {ALPHA}, dropout: 0.0, target_modules: all-linear}}
data: {{train: {data}, max_seq_len: {SEQ}, packing: true}}
training: {{max_steps: {STEPS}, batch_size: 1, lr: {LR}, optimizer: {optimizer}, gradient_checkpointing: true,
           bf16: false, log_every: 1, release_host_memory: true}}
evaluation: {{generation: false}}
""")
    load: dict[str, Any] = {}
    loop.load_model = measured_load(loop.load_model, load)  # the load `lorafit train` does, measured
    try:
        sft.train(load_run_config(config_path))
    except Exception as err:  # noqa: BLE001 - a refused optimizer (paged on CPU) is a result to report
        return {"error": f"{type(err).__name__}: {err}", "load": load}
    rows = read_metrics(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    return {"step_peaks": [row["peak_rss_mib"] * 2**20 for row in rows],
            "s_per_step": summary["phases_s"]["train_s"] / len(rows), "phases_s": summary["phases_s"],
            "process_peak": peak_rss_bytes(), "loss": [row["loss"] for row in rows], "load": load}


def worker_peft(model: str, out: Path, load_only: bool) -> dict[str, Any]:
    result: dict[str, Any] = {}
    try:
        import torch
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        result["phase"] = "load"
        emit_phase("load")
        reset_peak_rss()
        start = time.perf_counter()
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        base = AutoModelForCausalLM.from_pretrained(model, quantization_config=quant, dtype=torch.float32,
                                                    device_map="cpu")
        result.update(load_peak=peak_rss_bytes(), load_after=current_rss_bytes(),
                      load_s=time.perf_counter() - start)
        if load_only:
            result["phase"] = "done"
            return result
        result["phase"] = "prepare"
        emit_phase("prepare (prepare_model_for_kbit_training, get_peft_model)")
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True,
                                               gradient_checkpointing_kwargs={"use_reentrant": False})
        peft_model = get_peft_model(base, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
        tokenizer = AutoTokenizer.from_pretrained(model)
        ids = tokenizer(SENTENCE * 30, return_tensors="pt").input_ids[:, :SEQ]
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=LR)
        result["phase"] = "train"
        emit_phase("train")
        peft_model.train()
        reset_peak_rss()
        times = []
        for _ in range(STEPS):
            start = time.perf_counter()
            loss = peft_model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
        result.update(train_peak=peak_rss_bytes(), s_per_step=times)
        result["phase"] = "save"
        emit_phase("save")
        peft_model.save_pretrained(out)
        result["phase"] = "done"
    except Exception as err:  # noqa: BLE001 - where PEFT + bitsandbytes fails is the result
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc(limit=3)
    result["process_peak"] = peak_rss_bytes()
    return result


def estimate(model: str, optimizer: str) -> int:
    from lorafit.diagnose.memory import estimate_memory

    return estimate_memory(model, method="qlora", r=R, batch=1, seq=SEQ, grad_checkpointing=True,
                           precision="fp32", optimizer=optimizer).total


def gb(value: float | None) -> str:
    return "-" if value is None else f"{value / GB:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", required=True, help="a checkpoint folder written by make_checkpoint.py")
    parser.add_argument("--optimizers", nargs="*", default=["adamw"], help="one lorafit training run each")
    parser.add_argument("--load-only", action="store_true", help="no training: the loads (8B training takes hours on 2 cores)")
    parser.add_argument("--peft", action="store_true", help="also run transformers + PEFT + bitsandbytes")
    parser.add_argument("--work", type=Path, default=Path("/tmp/lorafit-bench/runs"))
    parser.add_argument("--rss-limit-gb", type=float, default=14.0,
                        help="kill a worker whose RSS passes this (a shared machine); reported as where it fails")
    parser.add_argument("--min-available-gb", type=float, default=1.5,
                        help="kill a worker when the machine's available memory falls below this")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    name = Path(args.model).name
    if args.worker:
        out = args.work / f"{name}-{args.phase}-{args.optimizer}"
        result = {"baseline": worker_baseline, "load": lambda: worker_load(args.model),
                  "train": lambda: worker_train(args.model, args.optimizer, out),
                  "peft": lambda: worker_peft(args.model, out, args.load_only)}[args.phase]()
        emit_worker_result(result)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)

    def worker(phase: str, optimizer: str = "-") -> dict[str, Any]:
        print(f"== {name}: {phase} {optimizer}", flush=True)
        return run_worker(__file__, ["--model", args.model, "--work", str(args.work), "--phase", phase,
                                     "--optimizer", optimizer, *(["--load-only"] if args.load_only else [])],
                          rss_limit=int(args.rss_limit_gb * GB), min_available=int(args.min_available_gb * GB))

    results: dict[str, Any] = {"model": args.model, "settings": {"r": R, "alpha": ALPHA, "seq": SEQ, "steps": STEPS,
                                                                 "quantize": "nf4+double", "grad_checkpointing": True},
                               "machine": machine_info(__import__("torch").device("cpu"))}
    out = RESULTS_DIR / f"scale_{name}.json"
    results["estimate"] = {opt: estimate(args.model, opt) for opt in args.optimizers}
    results["baseline"] = worker("baseline")
    results["train"] = {}
    optimizers = [] if args.load_only else args.optimizers
    if args.load_only:
        results["load"] = worker("load")
    # the first optimizer, then PEFT, then the others: on a busy machine the comparison comes first.
    # Results are saved after every worker, so a run stopped midway keeps what it measured.
    for phase, optimizer in [*[("train", o) for o in optimizers[:1]], *([("peft", "-")] if args.peft else []),
                             *[("train", o) for o in optimizers[1:]]]:
        save_results(results, out)
        if phase == "peft":
            results["peft"] = worker("peft")
        else:
            results["train"][optimizer] = {**worker("train", optimizer), "estimate": results["estimate"][optimizer]}
            results.setdefault("load", results["train"][optimizer].get("load"))  # the first training run's load
    finish(results, out)
    return 0


def load_ratio(load: dict[str, Any]) -> float:
    """The load's peak growth of RSS over the final model's (both above the RSS before the load): the issue's <= 1.2x."""
    return (load["peak"] - load["before"]) / (load["after"] - load["before"])


def finish(results: dict[str, Any], out: Path) -> None:
    """The table (markdown, beside the JSON) and the final JSON."""
    base = results["baseline"]["rss"]
    load = results.get("load") or {"error": "not measured (the worker failed before its load ended)"}
    rows = [["lorafit load", "", "", "", "", "", load["error"]] if "error" in load else
            ["lorafit load", gb(load["peak"]), gb(load["after"]),
             f"growth {gb(load['peak'] - load['before'])} = {load_ratio(load):.2f}x the model's {gb(load['after'] - load['before'])}",
             f"{load['seconds']:.0f} s", "", ""]]
    for opt, run in results["train"].items():
        if "error" in run:
            rows.append([f"lorafit train {opt}", "", "", "", "", "", run["error"]])
            continue
        peak = max(run["step_peaks"])
        ratio = run["estimate"] / (peak - base)
        run.update(train_peak=peak, estimate_ratio=ratio)
        rows.append([f"lorafit train {opt}", gb(peak), gb(peak - base), f"estimate {gb(run['estimate'])} (x{ratio:.2f})",
                     f"{run['s_per_step']:.1f} s/step", f"loss {run['loss'][0]:.3f}", ""])
    if "peft" in results:
        p = results["peft"]
        rows.append(["PEFT+bnb load", gb(p.get("load_peak")), gb(p.get("load_after")), "", "", "", p.get("error", "")])
        rows.append(["PEFT+bnb train", gb(p.get("train_peak")), gb(p["train_peak"] - base) if "train_peak" in p else "-", "",
                     f"{min(p['s_per_step']):.1f} s/step" if "s_per_step" in p else "", "", ""])
    for opt, total in results["estimate"].items():
        rows.append([f"estimate-memory {opt}", "", gb(total), "step bytes (compare: train minus baseline)", "", "", ""])
    table = markdown_table(["phase", "peak RSS GB", "minus baseline / after GB", "vs", "time", "", "error"], rows)
    text = (f"# QLoRA at scale: {results['model']}\n\nbaseline process (import lorafit): {gb(base)} GB RSS\n\n{table}\n")
    print(text)
    save_results(results, out)
    write_text_atomic(out.with_suffix(".md"), text)


if __name__ == "__main__":
    sys.exit(main())
