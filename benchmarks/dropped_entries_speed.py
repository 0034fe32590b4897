"""Where DoRA's sparse products over dropped entries beat dense matmuls: the threshold of lorafit.adapters.dropped_entries.

For each layer shape of SmolLM2 (576 -> 1536 gate/up, 1536 -> 576 down, 576 -> 576 attention) and dropout rate, the
time of
- forward:  W0·(x ⊙ keep) as a dense matmul (what PEFT's formula computes) against W0·(x ⊙ drop), the sparse product
  (lorafit subtracts it from the base output it already has);
- backward: keep ⊙ (G W0) dense against drop ⊙ (G W0) sampled at the dropped entries (the rest joins the base
  layer's own input-gradient matmul).
1024 rows, fp32, the dense and sparse versions interleaved, median of --repeats. A ratio below 1 means the sparse
product is faster; SPARSE_DROPOUT_MAX_RATE should sit where the ratios cross 1.

Run: python benchmarks/dropped_entries_speed.py [--repeats 15] [--out PATH]  (threads: torch's default)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import RESULTS_DIR, machine_info, markdown_table, median, save_results

from lorafit.adapters.branch import dropout_keep_mask
from lorafit.adapters.dropped_entries import SPARSE_DROPOUT_MAX_RATE, dropped_input_grad, dropped_product

ROWS = 1024
SHAPES = ((576, 1536), (1536, 576), (576, 576))  # (in, out)
RATES = (0.05, 0.1, 0.2)


def seconds(fn: Callable[[], torch.Tensor]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(in_features: int, out_features: int, rate: float, repeats: int) -> dict[str, float]:
    """Median seconds of the dense and sparse forward and backward products for one shape and rate."""
    torch.manual_seed(0)
    x, weight = torch.randn(ROWS, in_features), torch.randn(out_features, in_features) * 0.02
    grad = torch.randn(ROWS, out_features)
    keep = dropout_keep_mask(x, rate)[0]
    candidates = {
        "forward_dense": lambda: (x * keep) @ weight.t(),
        "forward_sparse": lambda: dropped_product(x, keep, weight),
        "backward_dense": lambda: (grad @ weight).mul_(keep),
        "backward_sparse": lambda: dropped_input_grad(grad, keep, weight),
    }
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for fn in candidates.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in candidates.items():
            times[name].append(seconds(fn))
    return {name: median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "dropped_entries_speed.json")
    args = parser.parse_args()
    runs, rows = [], []
    for in_features, out_features in SHAPES:
        for rate in RATES:
            result = measure(in_features, out_features, rate, args.repeats)
            forward, backward = (result[f"{d}_sparse"] / result[f"{d}_dense"] for d in ("forward", "backward"))
            both = (result["forward_sparse"] + result["backward_sparse"]) / (
                result["forward_dense"] + result["backward_dense"])
            runs.append({"in": in_features, "out": out_features, "rate": rate, "seconds": result,
                         "sparse_over_dense": {"forward": forward, "backward": backward, "both": both}})
            rows.append([f"{in_features} -> {out_features}", f"{rate:g}",
                         f"{1e3 * result['forward_dense']:.1f} / {1e3 * result['forward_sparse']:.1f}",
                         f"{forward:.2f}x",
                         f"{1e3 * result['backward_dense']:.1f} / {1e3 * result['backward_sparse']:.1f}",
                         f"{backward:.2f}x", f"{both:.2f}x"])
            print(rows[-1], flush=True)
    table = markdown_table(["layer", "dropout", "forward ms dense / sparse", "ratio", "backward ms dense / sparse",
                            "ratio", "both"], rows)
    print(f"\n{ROWS} rows, fp32, {torch.get_num_threads()} threads; lorafit uses the sparse products at dropout <= "
          f"{SPARSE_DROPOUT_MAX_RATE:g}\n\n{table}")
    save_results({"benchmark": "dropped_entries_speed", "machine": machine_info(torch.device("cpu")),
                  "threads": torch.get_num_threads(), "rows": ROWS, "max_rate": SPARSE_DROPOUT_MAX_RATE,
                  "runs": runs}, args.out)


if __name__ == "__main__":
    main()
