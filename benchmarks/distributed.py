"""`lorafit train` on 1 vs 2 processes (torchrun, gloo) on this CPU, and the estimator's per-rank memory on 8 GPUs.

Part 1 (measured): the same run file (SmolLM2-135M-Instruct, or with --layers N a randomly initialised model of
its shape with N blocks and its tokenizer, for a shared CPU; orders data, packed rows) trained for a few steps by the real trainer, once in 1 process and on 2 processes with DDP and with FSDP2, for an fp32 and an
NF4 base. tokens/s is the median of the trainer's own per-step figure (the global step's tokens over its wall
time, rank 0's metrics.jsonl) over the steps after the first; peak RSS is each rank's peak RSS (VmHWM) at the end
(model load included). Every process runs one thread (OMP_NUM_THREADS=1), like one device per rank: the 2-process
ratio is what a second core buys minus what sharding and gloo communication cost. (Two OpenMP threads in one
process stall badly on a shared CPU, whose other load deschedules one of them.) Read the ratios, not the
absolute numbers.

Part 2 (estimated, no weights loaded): lorafit.diagnose.memory for Llama-3-8B and Llama-3-70B (their published
config.json values), LoRA bf16 and QLoRA, on 1 GPU and per rank of 8 GPUs with DDP and FSDP — what
`lorafit estimate-memory --model CONFIG --method qlora --gpus 8 --strategy fsdp` prints.

Run: python benchmarks/distributed.py [--model smollm2-135m] [--layers 4] [--steps 4] [--quick]
Writes benchmarks/results/distributed.json (not with --quick unless --out is given).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import GB, RESULTS_DIR, load_average, machine_info, markdown_table, save_results

from lorafit.device import peak_rss_bytes
from lorafit.diagnose.memory import estimate_memory
from lorafit.diagnose.model_shape import LLAMA_3_8B, ModelShape

ROOT = Path(__file__).resolve().parents[1]
MARK = "LORAFIT_BENCH "
LLAMA_3 = {  # the published config.json values of Meta's Llama-3 8B and 70B
    "Llama-3-8B": LLAMA_3_8B,
    "Llama-3-70B": ModelShape(name="Llama-3-70B", hidden_size=8192, intermediate_size=28672, num_layers=80,
                              num_heads=64, num_kv_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False),
}


def worker(argv: list[str]) -> None:
    """One rank (or the only process): `lorafit train ARGV`, then this rank's peak RSS on a marked line."""
    from lorafit import distributed
    from lorafit.cli import main

    try:
        code = main(["train", *argv])
        if code:
            raise SystemExit(code)
        print(MARK + json.dumps({"rank": distributed.rank(), "peak_rss_bytes": peak_rss_bytes()}), flush=True)
    finally:
        distributed.shutdown()


def shallow_copy(model: str, layers: int, folder: Path) -> str:
    """A model folder with `model`'s config and tokenizer but only `layers` blocks, randomly initialised (seed 0):
    the same per-block work and communication pattern at a fraction of the time."""
    from transformers import AutoModelForCausalLM

    import lorafit

    full, tokenizer = lorafit.load_model(model)  # for its config and tokenizer (a cached load takes about a second)
    config = full.config
    config.num_hidden_layers = layers
    del full
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def write_run(folder: Path, model: str, steps: int) -> Path:
    run = folder / "run.yaml"
    run.write_text(f"""
model: {model}
adapter: {{r: 16, alpha: 32, dropout: 0.0}}
data: {{train: {ROOT / 'examples/data/orders_train.jsonl'}, max_seq_len: 128, packing: true}}
training: {{max_steps: {steps}, batch_size: 4, micro_batch_size: 2, lr: 1.0e-4, bf16: false, seed: 0}}
evaluation: {{generation: false}}
""")
    return run


def measure(run: Path, out: Path, processes: int, strategy: str | None, base: str) -> dict[str, Any]:
    overrides = [f"output_dir={out}"] + (["quantize=nf4"] if base == "nf4" else [])
    overrides += [f"distributed.strategy={strategy}"] if strategy else []
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "benchmarks")])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    proc = subprocess.run([*launcher, __file__, "--worker", str(run), *overrides], env=env, stdout=subprocess.PIPE,
                          text=True, check=False)
    ranks = sorted((json.loads(line[len(MARK):]) for line in proc.stdout.splitlines() if line.startswith(MARK)),
                   key=lambda r: r["rank"])
    if proc.returncode or len(ranks) != processes:
        raise RuntimeError(f"{processes} process(es) {strategy or ''} {base}: exit {proc.returncode}; stdout tail:\n"
                           + proc.stdout[-3000:])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]
    return {"processes": processes, "strategy": strategy or "none", "base": base, "threads_per_process": 1,
            "tokens_per_s": statistics.median(speeds), "losses": [r["loss"] for r in rows],
            "peak_rss_mib_per_rank": [round(r["peak_rss_bytes"] / 2**20, 1) for r in ranks]}


def estimates() -> list[dict[str, Any]]:
    rows = []
    for name, shape in LLAMA_3.items():
        for method, precision in (("lora", "bf16"), ("qlora", "bf16")):
            for gpus, strategy in ((1, "ddp"), (8, "ddp"), (8, "fsdp")):
                e = estimate_memory(shape, method=method, r=16, batch=1, seq=2048, grad_checkpointing=True,
                                    precision=precision, gpus=gpus, strategy=strategy)
                rows.append({"model": name, "method": method, "gpus": gpus, "strategy": strategy,
                             "weights_gb_per_rank": round(e.weights / GB, 2), "total_gb_per_rank": round(e.total / GB, 2)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, help="train a random model of --model's shape with this many blocks")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--bases", nargs="+", default=["fp32", "nf4"])
    parser.add_argument("--quick", action="store_true", help="2 steps, fp32 only, nothing written")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    steps, bases = (2, ["fp32"]) if args.quick else (args.steps, args.bases)
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        model = shallow_copy(args.model, args.layers, Path(tmp) / "model") if args.layers else args.model
        run = write_run(Path(tmp), model, steps)
        for base in bases:
            for processes, strategy in ((1, None), (2, "ddp"), (2, "fsdp")):
                result = measure(run, Path(tmp) / f"{base}-{processes}-{strategy}", processes, strategy, base)
                print(json.dumps(result), flush=True)
                measured.append(result)
    table = []
    for r in measured:
        one = next(m for m in measured if m["base"] == r["base"] and m["processes"] == 1)
        table.append([r["base"], r["processes"], r["strategy"], f"{r['tokens_per_s']:.0f}",
                      f"{r['tokens_per_s'] / one['tokens_per_s']:.2f}",
                      " / ".join(f"{v:.0f}" for v in r["peak_rss_mib_per_rank"]),
                      f"{max(abs(a - b) / abs(b) for a, b in zip(r['losses'], one['losses'])):.1e}"])
    print(markdown_table(["base", "processes", "strategy", "tokens/s", "vs 1 process", "peak RSS MiB per rank",
                          "max rel. loss diff vs 1"], table))
    planned = estimates()
    print(markdown_table(["model", "method", "GPUs", "strategy", "weights GB / rank", "total GB / rank"],
                         [[e["model"], e["method"], e["gpus"], e["strategy"], e["weights_gb_per_rank"],
                           e["total_gb_per_rank"]] for e in planned]))
    out = args.out if args.out or args.quick else RESULTS_DIR / "distributed.json"
    save_results({"model": args.model, "layers": args.layers, "steps": steps, "measured": measured, "estimated": planned,
                  "machine": machine_info(torch.device("cpu")), "load_average_end": load_average()}, out)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
    else:
        main()
