"""Which levers make the quickstart adapter generalise: each variant of examples/quickstart.yaml trained and scored.

A variant is a data recipe of examples/make_orders.py (copy-teaching, broad phrasing, wide pools, replay) plus
`key=value` overrides of the run file (the CLI's own override syntax). Each trains in its own `lorafit train` process
(its wall time and CPU time are measured; the CPU time is what a loaded machine does not inflate), then its
adapter is loaded on the run's base (NF4 for quantize: nf4) and scored greedily by the run's metric on
  - in_distribution: the recipe's own eval split (real-vocabulary orders in the train phrasings),
  - out_of_distribution: examples/data/orders_ood.jsonl (held-out items, colours, cities, phrasings, 21-99),
  - independent / independent2: examples/data/orders_independent.jsonl (80) and orders_independent2.jsonl (100),
    order messages written without seeing the generator (only with --sets: never trained on; both guided the
    wide pools' design and the choice of recipe, so they are development sets now; orders_independent3.jsonl,
    written blind, is kept out of this script: benchmarks/results/generalisation_study.md).
No variant's train file holds a value of the OOD file or of the two independent files (tests/examples).

Run:  python benchmarks/generalisation.py --variants baseline copy_broad [--id-limit 30]
      python benchmarks/generalisation.py --variants copy_broad --score-only --sets independent
Results merge by variant name into benchmarks/results/generalisation.json (an earlier variant is kept unless
run again), and the table of every stored variant is printed and written next to it as generalisation.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import RESULTS_DIR, load_average, machine_info, markdown_table, save_results

from lorafit.adapters.io import load_adapter
from lorafit.adapters.prepare import quantize_at_load
from lorafit.evaluation.eval_sets import evaluate_sets
from lorafit.fileio import write_text_atomic
from lorafit.models import load_model
from lorafit.run_config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
OOD_FILE = EXAMPLES / "data" / "orders_ood.jsonl"
INDEPENDENT_FILE = EXAMPLES / "data" / "orders_independent.jsonl"
INDEPENDENT2_FILE = EXAMPLES / "data" / "orders_independent2.jsonl"
OUT = RESULTS_DIR / "generalisation.json"


@dataclass(frozen=True)
class Variant:
    """A quickstart variant: its data recipe (make_orders options), run file and config overrides."""

    copy_share: float = 0.0
    broad: bool = False
    compound_share: float = 0.0  # made-up items written as two words
    rich_share: float = 0.0  # real-vocabulary orders from make_orders' wide pools (compound items, idioms, chatter)
    train_rows: int = 400
    replay_share: float = 0.0  # the base model's own general replies mixed in (examples/make_replay.py)
    config: str = "quickstart.yaml"
    overrides: tuple[str, ...] = ()
    note: str = ""

    @property
    def recipe(self) -> str:
        recipe = f"copy{self.copy_share:g}_{'broad' if self.broad else 'plain'}_compound{self.compound_share:g}"
        recipe += f"_rich{self.rich_share:g}_{self.train_rows}" if self.rich_share else ""
        return recipe + (f"_replay{self.replay_share:g}" if self.replay_share else "")


NEW = {"copy_share": 0.5, "broad": True}  # the previous quickstart's recipe (400 rows, 30 steps)
QUICKSTART = {"copy_share": 0.4, "broad": True, "rich_share": 0.5, "train_rows": 800, "replay_share": 0.15}
QUICKSTART_RUN = ("training.max_steps=60", "training.lr=1e-3")  # what examples/quickstart.yaml holds
VARIANTS: dict[str, Variant] = {
    "baseline": Variant(note="the first quickstart: 400 rows of the 16 train phrasings, lr 1e-3, r16, 30 steps"),
    "copy": Variant(copy_share=0.5, note="half the rows order made-up items/colours/cities"),
    "broad": Variant(broad=True, note="28 phrasings, casing, a/an, quantities 100-999"),
    "copy_broad_compound": Variant(**NEW, compound_share=0.2,
                                   note="both, a fifth of made-up items two words (colour/item ambiguous)"),
    "copy_broad": Variant(**NEW, note="both"),
    "copy_broad_neftune5": Variant(**NEW, overrides=("training.neftune_noise_alpha=5",), note="+ NEFTune alpha 5"),
    "copy_broad_r8": Variant(**NEW, overrides=("adapter.r=8", "adapter.alpha=16"), note="+ r8 alpha16"),
    "copy_broad_lr5e-4": Variant(**NEW, overrides=("training.lr=5.0e-4",), note="+ lr 5e-4"),
    "copy_broad_compound_qlora": Variant(**NEW, compound_share=0.2, config="quickstart_qlora.yaml",
                                         note="QLoRA run file, the compound-item data"),
    "copy_broad_attention": Variant(**NEW, overrides=("adapter.target_modules=[q_proj,k_proj,v_proj,o_proj]",),
                                    note="+ attention-only targets"),
    "copy_broad_dora": Variant(**NEW, overrides=("adapter.use_dora=true",), note="+ DoRA"),
    "copy_broad_20steps": Variant(**NEW, overrides=("training.max_steps=20",), note="+ 20 steps (fewer)"),
    "copy_broad_45steps": Variant(**NEW, overrides=("training.max_steps=45",), note="+ 45 steps (more)"),
    "copy_broad_qlora": Variant(**NEW, config="quickstart_qlora.yaml", note="QLoRA run file, same data"),
    "copy_broad_dora_dropout": Variant(**NEW, overrides=("adapter.use_dora=true", "adapter.dropout=0.05"),
                                       note="+ DoRA, dropout 0.05 (PEFT's formula)"),
    "copy_broad_dora_dropout_lowrank": Variant(**NEW, overrides=("adapter.use_dora=true", "adapter.dropout=0.05",
                                                                 "adapter.dora_dropout_lowrank_only=true"),
                                               note="+ DoRA, dropout 0.05 on the low-rank path only"),
    # the wide pools (make_orders --rich-share): compound items, idioms, thousands, chatter
    "rich30_600_45": Variant(copy_share=0.4, broad=True, rich_share=0.3, train_rows=600,
                             overrides=("training.max_steps=45",), note="30% wide-pool rows, 600 rows, 45 steps"),
    "rich30_600_45_lr1e-3": Variant(copy_share=0.4, broad=True, rich_share=0.3, train_rows=600,
                                    overrides=("training.max_steps=45", "training.lr=1e-3"), note="+ lr 1e-3"),
    "rich50_800_60": Variant(copy_share=0.4, broad=True, rich_share=0.5, train_rows=800,
                             overrides=("training.max_steps=60",), note="50% wide-pool rows, 800 rows, 60 steps"),
    "rich50_800_60_compound": Variant(copy_share=0.4, broad=True, rich_share=0.5, train_rows=800, compound_share=0.4,
                                      overrides=("training.max_steps=60",), note="+ 40% made-up items two words"),
    "rich50_800_60_compound_neftune5": Variant(copy_share=0.4, broad=True, rich_share=0.5, train_rows=800,
                                               compound_share=0.4,
                                               overrides=("training.max_steps=60", "training.neftune_noise_alpha=5"),
                                               note="+ NEFTune alpha 5"),
    "rich50_800_60_lr1e-3_replay15": Variant(copy_share=0.4, broad=True, rich_share=0.5, train_rows=800,
                                             replay_share=0.15,
                                             overrides=("training.max_steps=60", "training.lr=1e-3"),
                                             note="+ lr 1e-3, 15% replay, 8 form phrasings: the quickstart"),
    # one lever at a time on the quickstart's recipe (session 5)
    "qs_r8": Variant(**QUICKSTART, overrides=(*QUICKSTART_RUN, "adapter.r=8", "adapter.alpha=16"), note="+ r8 alpha16"),
    "qs_r32": Variant(**QUICKSTART, overrides=(*QUICKSTART_RUN, "adapter.r=32", "adapter.alpha=64"),
                      note="+ r32 alpha64"),
    "qs_attention": Variant(**QUICKSTART, overrides=(*QUICKSTART_RUN,
                                                     "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj]"),
                            note="+ attention-only targets"),
    "qs_dora": Variant(**QUICKSTART, overrides=(*QUICKSTART_RUN, "adapter.use_dora=true"), note="+ DoRA"),
    "qs_30steps": Variant(**QUICKSTART, overrides=("training.max_steps=30", "training.lr=1e-3"), note="30 steps"),
    "qs_90steps": Variant(**QUICKSTART, overrides=("training.max_steps=90", "training.lr=1e-3"), note="90 steps"),
    "qs_early_stop_id": Variant(**QUICKSTART, overrides=(
        *QUICKSTART_RUN, "evaluation.every=5", "evaluation.early_stopping={patience: 2, monitor: eval_loss}"),
        note="early stopping on the in-distribution held-out loss (every 5 steps, patience 2)"),
    "qs_early_stop_ood": Variant(**QUICKSTART, overrides=(
        *QUICKSTART_RUN, "evaluation.every=5", f"evaluation.sets={{out_of_distribution: {OOD_FILE}}}",
        "evaluation.early_stopping={patience: 2, monitor: out_of_distribution}"),
        note="early stopping on the OOD file's loss (every 5 steps, patience 2): selects on the test set"),
    "qs_qlora": Variant(**QUICKSTART, config="quickstart_qlora.yaml", note="the QLoRA quickstart (NF4, LoftQ 1 iter)"),
    "qs_qlora_lr2e-3": Variant(**QUICKSTART, config="quickstart_qlora.yaml", overrides=("training.lr=2e-3",),
                               note="QLoRA + lr 2e-3"),
    "qs_qlora_90steps": Variant(**QUICKSTART, config="quickstart_qlora.yaml", overrides=("training.max_steps=90",),
                                note="QLoRA + 90 steps"),
    "qs_qlora_loftq5": Variant(**QUICKSTART, config="quickstart_qlora.yaml", overrides=("adapter.loftq_iter=5",),
                               note="QLoRA + 5 LoftQ iterations"),
    "qs_qlora_plain": Variant(**QUICKSTART, config="quickstart_qlora.yaml",
                                 overrides=("adapter.init=default", "adapter.alpha=32"),
                                 note="QLoRA, PEFT default init (no LoftQ), alpha 32"),
}


def _make_orders():
    spec = importlib.util.spec_from_file_location("make_orders", EXAMPLES / "make_orders.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations via sys.modules
    spec.loader.exec_module(module)
    return module


def write_recipe(variant: Variant, work: Path) -> Path:
    """Generate the variant's train/eval files (seed 0, train_rows/60 rows) under work/<recipe>/data; returns that
    folder."""
    folder = work / variant.recipe
    args = ["--seed", "0", "--train", str(variant.train_rows), "--eval", "60", "--copy-share", str(variant.copy_share),
            "--broad" if variant.broad else "--no-broad", "--compound-share", str(variant.compound_share),
            "--rich-share", str(variant.rich_share), "--replay-share", str(variant.replay_share),
            "--out-dir", str(folder)]
    _make_orders().main(args)
    return folder / "data"


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_variant(name: str, variant: Variant, data: Path, work: Path) -> tuple[Path, dict[str, float]]:
    """`lorafit train` the variant without its own generation evals; returns (run folder, timings)."""
    run_dir = work / "runs" / name
    overrides = [f"output_dir={run_dir}", f"data.train={data / 'orders_train.jsonl'}",
                 f"data.eval={data / 'orders_eval.jsonl'}", "evaluation.generation=false", "evaluation.sets={}",
                 "evaluation.forgetting=false", "evaluation.every=0", "training.save_every=0", *variant.overrides]
    command = [sys.executable, "-m", "lorafit", "train", str(EXAMPLES / variant.config), *overrides, "--overwrite"]
    print("$", " ".join(command), flush=True)
    cpu, start = child_cpu_seconds(), time.perf_counter()
    subprocess.run(command, check=True)
    return run_dir, {"train_wall_s": time.perf_counter() - start, "train_cpu_s": child_cpu_seconds() - cpu}


SETS = ("in_distribution", "out_of_distribution", "independent", "independent2")


def score_variant(variant: Variant, run_dir: Path, data: Path, sets: list[str],
                  id_limit: int | None) -> tuple[dict[str, Any], dict[str, float]]:
    """The adapter on the run's own base (NF4 for quantize: nf4), scored on `sets`; returns ({set: result}, timings)."""
    config = load_run_config(EXAMPLES / variant.config, list(variant.overrides))
    cpu, start = self_cpu_seconds(), time.perf_counter()
    # as the trainer loads it: LoftQ quantises the float base itself when the adapter attaches
    quantize = quantize_at_load(config.adapter.init, config.quantize)
    model, tokenizer = load_model(config.model, quantize=quantize, double_quant=config.double_quant)
    load_adapter(model, run_dir / "adapter")
    metric, options = config.evaluation.metric, {"max_new_tokens": config.evaluation.max_new_tokens}
    files = {"in_distribution": data / "orders_eval.jsonl", "out_of_distribution": OOD_FILE,
             "independent": INDEPENDENT_FILE, "independent2": INDEPENDENT2_FILE}
    results = {}
    for name in sets:
        limit = id_limit if name == "in_distribution" else None
        results |= evaluate_sets(model, tokenizer, {name: (files[name], metric)}, limit=limit, progress=True, **options)
    for result in results.values():
        result.pop("samples", None)
    return results, {"eval_wall_s": time.perf_counter() - start, "eval_cpu_s": self_cpu_seconds() - cpu}


def _cell(result: dict[str, Any] | None) -> str:
    if result is None:
        return "-"
    return f"{100 * result['accuracy']:.1f} ± {100 * result['stderr']:.1f} ({result['correct']}/{result['total']})"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(results: dict[str, Any]) -> str:
    rows = []
    for name, entry in results["variants"].items():
        sets = entry["sets"]
        rows.append([name, _cell(sets.get("in_distribution")), _cell(sets.get("out_of_distribution")),
                     _cell(sets.get("independent")), _cell(sets.get("independent2")),
                     _seconds(entry.get("train_wall_s")), _seconds(entry.get("train_cpu_s")),
                     entry["note"]])
    headers = ["variant", "ID %", "OOD % ± SE", "independent % ± SE", "independent2 % ± SE", "train wall s",
               "train CPU s", "what"]
    return markdown_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["baseline", "copy_broad"])
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS[:2]),
                        help="sets to score (independent: the final held-out check, never a tuning target)")
    parser.add_argument("--score-only", action="store_true",
                        help="score the adapters already trained under --work (their training timings are kept)")
    parser.add_argument("--id-limit", type=int, help="score only the first N in-distribution rows (saves time)")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "generalisation", help="data and run folders")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if "independent" in args.sets and not INDEPENDENT_FILE.is_file():
        raise SystemExit(f"--sets independent: {INDEPENDENT_FILE} does not exist")
    for name in args.variants:
        variant = VARIANTS[name]
        data = write_recipe(variant, args.work)
        load_before = load_average()
        if args.score_only:
            run_dir, timings = args.work / "runs" / name, {}
        else:
            run_dir, timings = train_variant(name, variant, data, args.work)
        sets, eval_timings = score_variant(variant, run_dir, data, args.sets, args.id_limit)
        # read again just before writing: a second invocation running meanwhile keeps its variants
        results = json.loads(args.out.read_text()) if args.out.is_file() else {"variants": {}}
        results["machine"] = machine_info(torch.device("cpu"))
        previous = results["variants"].get(name, {})
        results["variants"][name] = {
            **previous, "note": variant.note, "recipe": variant.recipe, "config": variant.config,
            "overrides": list(variant.overrides), "sets": {**previous.get("sets", {}), **sets}, **timings,
            f"eval_{'_'.join(args.sets)}": eval_timings,
            "load_average_before": load_before, "load_average_after": load_average(),
        }
        print(f"{name}: " + ", ".join(f"{k} {_cell(v)}" for k, v in sets.items()), flush=True)
        save_results(results, args.out)  # after every variant: a long study keeps what it measured
    results = json.loads(args.out.read_text())
    print(table(results))
    write_text_atomic(args.out.with_suffix(".md"), table(results) + "\n")


if __name__ == "__main__":
    main()
