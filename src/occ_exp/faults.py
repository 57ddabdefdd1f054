"""Test-only fault injection: a real signal at a named point of a run, so tests can prove that a
crash or a pre-emption there loses nothing. Inert unless the environment variable OCC_EXP_FAULT
is set.

    OCC_EXP_FAULT=<action>_<place>:<step>[,<action>_<place>:<step>...]

| place         | where                                                                            |
|---------------|----------------------------------------------------------------------------------|
| `during_save` | `checkpoint.save_checkpoint`, after the model and trainer state are written under the temporary name, before the manifest and the rename |
| `during_step` | `trainer.train`, after the step's update, before its metrics and checkpoint      |
| `after_step`  | `trainer.train`, at the end of the step (after its metrics row and its checkpoint, if any) |

| action          | signal                                                                   |
|-----------------|--------------------------------------------------------------------------|
| `kill`          | SIGKILL to this process (no handler, no cleanup, no flush)               |
| `sigterm`       | SIGTERM to this process                                                  |
| `sigterm_group` | SIGTERM to this process's whole process group (as Slurm does to a job step: the verifier workers and any logger process get it too) |

Example: `OCC_EXP_FAULT=kill_during_save:4 python -m occ_exp.train ...`
"""

from __future__ import annotations

import os
import signal

ENV = "OCC_EXP_FAULT"
PLACES = ("during_save", "during_step", "after_step")
ACTIONS = {
    "kill": lambda: os.kill(os.getpid(), signal.SIGKILL),
    "sigterm": lambda: os.kill(os.getpid(), signal.SIGTERM),
    "sigterm_group": lambda: os.killpg(os.getpgrp(), signal.SIGTERM),
}


def parse(spec: str) -> set[tuple[str, str, int]]:
    """`spec` as a set of (action, place, step); a malformed spec is a ValueError naming the choices."""
    out = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, step = item.partition(":")
        match = [(a, p) for a in ACTIONS for p in PLACES if name == f"{a}_{p}"]
        if not match or not step.isdigit():
            raise ValueError(f"{ENV}={spec!r}: expected <action>_<place>:<step> with action in {sorted(ACTIONS)} "
                             f"and place in {list(PLACES)}, got {item!r}")
        out.add((*match[0], int(step)))
    return out


def fault_point(place: str, step: int) -> None:
    """Deliver the signal OCC_EXP_FAULT asks for at (place, step); otherwise do nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    for action, p, s in parse(spec):
        if p == place and s == step:
            ACTIONS[action]()
