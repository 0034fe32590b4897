"""`python -m lorafit ...`, and the entry point for several processes: `torchrun ... -m lorafit train run.yaml`.

record_errors lets torchrun report a failing rank's error and end the other ranks; the process group (if
any) is left in the end, whatever happened. A process of a multi-process run then exits without the interpreter's
finalization: objects still referring to the destroyed group (FSDP's device mesh, finished collective handles)
would otherwise be torn down with it, and gloo's threads can then abort the process ("terminate called without an
active exception", seen once on a loaded machine after a run had saved everything). Every file lorafit writes is
already fsynced and renamed by then; the standard streams are flushed first.
"""

from __future__ import annotations

import os
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


def exit_process(code: int | None, world_size: int) -> None:
    """Exit with `code`: through os._exit after flushing the streams in a multi-process run (see the module
    docstring), normally otherwise."""
    if world_size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    sys.exit(code)


if __name__ == "__main__":
    exit_process(run(), int(os.environ.get("WORLD_SIZE", "1")))
