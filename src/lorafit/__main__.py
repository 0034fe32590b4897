"""`python -m lorafit ...`, and the entry point for several processes: `torchrun ... -m lorafit train run.yaml`.

record_errors lets torchrun report a failing rank's error and end the other ranks; the process group (if
any) is left in the end, whatever happened.
"""

from __future__ import annotations

import sys

from lorafit import distributed
from lorafit.cli import main


@distributed.record_errors
def run() -> int:
    """The `lorafit` command, then leave the process group."""
    try:
        return main()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(run())
