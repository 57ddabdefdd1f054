"""A worker for tests/test_distributed_faults.py: gloo all-reduces in a loop, with one rank made to
fail. Run with torchrun, or with RANK/WORLD_SIZE/MASTER_* set by hand.

    python tests/dist_fault_worker.py <fault: kill|stop|raise> <victim rank> <watchdog timeout s, 0 = none>
"""

import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from occ_exp.distributed_faults import PeerWatchdog


def main() -> None:
    fault, victim, wd_timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    pg_timeout = float(os.environ.get("PG_TIMEOUT_S", "1800"))
    dist.init_process_group("gloo", timeout=timedelta(seconds=pg_timeout))
    rank = dist.get_rank()
    watchdog = PeerWatchdog(timeout_s=wd_timeout) if wd_timeout > 0 else None
    if watchdog:
        watchdog.start()
    t = torch.ones(1)
    try:
        for i in range(600):
            if rank == victim and i == 5:
                print(f"rank {rank}: injecting {fault}", flush=True)
                if fault == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                elif fault == "stop":
                    os.kill(os.getpid(), signal.SIGSTOP)
                else:
                    raise ValueError("injected failure")
            dist.all_reduce(t)
            time.sleep(0.05)
    except BaseException as e:
        if watchdog:
            watchdog.__exit__(type(e), e, e.__traceback__)
        raise
    if watchdog:
        watchdog.stop()
    print(f"rank {rank}: finished", flush=True)


if __name__ == "__main__":
    main()
