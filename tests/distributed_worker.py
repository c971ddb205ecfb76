"""One process of a distributed test run (tests/test_distributed.py starts two of these, as torchrun would).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python -m tests.distributed_worker PLAN.json

PLAN.json: {"cases": [{"argv": [...minift CLI arguments...], "die": {"rank": 1, "step": 3}}, ...], "out": DIR}.
Each case is `minift finetune ...` run in this process, one after the other, in the same process group; the
exit statuses go to DIR/rank<r>.json. A case with "die" makes that rank exit abruptly (os._exit, like a kill)
at the start of that step, its batch read: the other rank must stop with an error.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

import minift.train.loop as loop
from minift.cli import main as minift_main


def die_during(step: int) -> None:
    real = loop.accumulate_gradients

    def dying(model, micro_batches, precision="fp32", scaler=None, current=0, **kwargs):
        if current == step:  # the step's batch is read; no collective of the step has started (FSDP's forward
            sys.stderr.flush()  # all-gathers, so a dying forward would itself wait for the other rank)
            os._exit(1)
        return real(model, micro_batches, precision, scaler, current, **kwargs)

    loop.accumulate_gradients = dying


def run(plan_file: str) -> None:
    torch.set_num_threads(1)
    plan = json.loads(Path(plan_file).read_text())
    rank = int(os.environ["RANK"])
    statuses = []
    for case in plan["cases"]:
        die = case.get("die")
        if die and die["rank"] == rank:
            die_during(die["step"])
        statuses.append(minift_main(case["argv"]))
        Path(plan["out"], f"rank{rank}.json").write_text(json.dumps(statuses))


if __name__ == "__main__":
    run(sys.argv[1])
