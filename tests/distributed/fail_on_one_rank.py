"""Entry point for `torchrun --nproc-per-node 2 fail_on_one_rank.py`: rank 1 raises while rank 0 waits in a barrier."""

from __future__ import annotations

from lorafit import distributed


@distributed.record_errors
def main() -> None:
    distributed.init(timeout_minutes=10)
    if distributed.rank() == 1:
        raise ValueError("rank 1 failed on purpose")
    distributed.barrier()  # never completes: rank 1 is gone


if __name__ == "__main__":
    main()
