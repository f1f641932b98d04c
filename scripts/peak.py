"""Run a stage command and report its peak host and GPU memory: `python3 scripts/peak.py LABEL LOG -- ARGS...`.

ARGS are the arguments of `python -m stages.cli`; the stage runs in this process, and at its end one
line `LABEL: wall S s, peak RSS X GiB, peak GPU Y GiB (torch max allocated), exit N` is printed and
appended to LOG. Standard library plus torch only where it was already imported: the GPU machine's
python has no extra packages.
"""

from __future__ import annotations

import resource
import runpy
import sys
import time


def main() -> int:
    label, log, sep, *args = sys.argv[1:]
    if sep != "--":
        raise SystemExit("usage: peak.py LABEL LOG -- ARGS...")
    sys.argv = ["stages.cli", *args]
    t0, rc = time.perf_counter(), 0
    try:
        runpy.run_module("stages.cli", run_name="__main__", alter_sys=True)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    gpu = "n/a"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}"
    line = (
        f"{label}: wall {time.perf_counter() - t0:.1f} s, peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB, peak GPU {gpu} GiB, exit {rc}"
    )
    print(line, file=sys.stderr)
    with open(log, "a") as f:
        f.write(line + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
