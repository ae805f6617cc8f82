"""Helper of test_cli_safety.py (not collected): runs ``dynaguide segment`` in forked children.

    python cli_kill_driver.py SPEC_JSON

The parent imports dynaguide and warms it up with one tiny run on one thread (no OpenMP
worker threads exist, so forking it is safe); each child runs :func:`dynaguide.cli.main` with ``os.replace``, ``os.write`` and
``os.fsync`` counted, and kills itself with SIGKILL at the chosen operation. ``SPEC``:

* ``{"mode": "kill", "argv": [...], "count_argv": [...], "seed": S, "rounds": R}``: count
  the operations of a full run (``count_argv``, into a scratch folder), then run ``argv``
  R times (without its ``--resume`` in even rounds), each killed at an operation drawn from
  ``numpy.random.default_rng(S)``, then once to the end; prints
  ``{"ops": N, "kills": [...], "killed": [...], "final": rc, "final_output": text}``.
* ``{"mode": "concurrent", "groups": [[argv, ...], ...]}``: for each group in turn, start
  its runs at once; prints ``[{"rcs": [...], "outputs": [stdout, ...]}, ...]``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

import dynaguide.cli

torch.set_num_threads(1)

_OPS = ("replace", "write", "fsync")


def _child(argv: list[str], kill_at: int | None, out_path: str) -> None:
    counter = [0]

    def counted(fn):
        def inner(*args, **kwargs):
            counter[0] += 1
            if kill_at is not None and counter[0] >= kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)

        return inner

    real = {name: getattr(os, name) for name in _OPS}
    with open(out_path, "w") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    for name in _OPS:
        setattr(os, name, counted(real[name]))
    rc = dynaguide.cli.main(argv)
    for name in _OPS:
        setattr(os, name, real[name])
    sys.stdout.flush()
    sys.stderr.flush()
    with open(out_path + ".ops", "w") as fh:
        fh.write(str(counter[0]))
    os._exit(rc)


def _start(argv: list[str], kill_at: int | None, out_path: str) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _child(argv, kill_at, out_path)
        finally:
            os._exit(99)
    return pid


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _warm_up(scratch: str) -> None:
    """One tiny run in this process: the children start with every lazy import done."""
    os.makedirs(os.path.join(scratch, "warm"))
    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(os.path.join(scratch, "warm", "w.png"))
    with open(os.devnull, "w") as null:
        saved = os.dup(1), os.dup(2)
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            dynaguide.cli.main(["segment", os.path.join(scratch, "warm"),
                                os.path.join(scratch, "warm-out"), "--max-iter", "1", "--guidance", "none",
                                "--quiet"])  # fmt: skip
        finally:
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)


def main() -> int:
    """Run the spec given as the first argument; prints one JSON line."""
    spec = json.loads(sys.argv[1])
    scratch = tempfile.mkdtemp(prefix="dg-kill-")
    _warm_up(scratch)
    if spec["mode"] == "kill":
        log = os.path.join(scratch, "count.log")
        assert _wait(_start(spec["count_argv"], None, log)) in (0, 1)
        with open(log + ".ops") as fh:
            ops = int(fh.read())
        rng = np.random.default_rng(spec["seed"])
        kills = [int(k) for k in rng.integers(1, ops + 1, size=spec["rounds"])]
        killed = []
        for i, k in enumerate(kills):  # odd rounds resume, even rounds redo everything
            argv = spec["argv"] if i % 2 else [a for a in spec["argv"] if a != "--resume"]
            status = _wait(_start(argv, k, os.path.join(scratch, f"r{i}.log")))
            killed.append(status == -signal.SIGKILL)
        final_log = os.path.join(scratch, "final.log")
        final = _wait(_start(spec["argv"], None, final_log))
        with open(final_log) as fh:
            text = fh.read()
        print(json.dumps({"ops": ops, "kills": kills, "killed": killed, "final": final,
                          "final_output": text}))  # fmt: skip
        return 0
    groups = []
    for g, runs in enumerate(spec["groups"]):  # one group after the other, its runs at once
        logs = [os.path.join(scratch, f"g{g}-{i}.log") for i in range(len(runs))]
        pids = [_start(argv, None, log) for argv, log in zip(runs, logs, strict=True)]
        rcs = [_wait(pid) for pid in pids]
        outputs = []
        for log in logs:
            with open(log) as fh:
                outputs.append(fh.read())
        groups.append({"rcs": rcs, "outputs": outputs})
    print(json.dumps(groups))
    return 0


if __name__ == "__main__":
    sys.exit(main())
