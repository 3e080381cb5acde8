"""Work dealt out to the processes of `accelerate launch` by the commands that do not train
(`encode`, `eval`, `sample`), with results that do not depend on how many processes ran.

The unit of work is fixed by the data, not by the process count: a shard of the latent
cache, a batch of images to evaluate or to sample, cut at multiples of the batch size.
Process r of N takes units r, r + N, r + 2N, ...; a unit's randomness comes from a seed
derived from (seed, its index) (`derived_seed`), and results are gathered and put back in
unit order (`gather_in_order`) before anything is summed. So one process and N processes
compute every unit identically (on the same device type and, on a CPU, with the same number
of threads per process, which decides how oneDNN reduces floats) and fold them in the same order.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env

Process = tuple[int, int]  # (index of this process, number of processes)


def process_state() -> PartialState:
    """Accelerate's process state, built as an Accelerator builds it: on the CPU where
    `accelerate launch` says so (ACCELERATE_USE_CPU), which a bare `PartialState()` ignores (it
    would then see one process per launched process)."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def this_process() -> Process:
    """(index, count) of this process under `accelerate launch`; (0, 1) without."""
    state = process_state()
    return state.process_index, state.num_processes


def derived_seed(seed: int, i: int) -> int:
    """The seed of unit i of a run seeded `seed`: numpy's SeedSequence of (seed, i), so no two
    (seed, i) pairs share a random stream (unlike seed + i); below 2**63, as torch takes it."""
    return int(np.random.SeedSequence((seed, i)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def gather_in_order(records: list[tuple[int, Any]], process: Process) -> list[tuple[int, Any]]:
    """Every process's (unit index, result) pairs, sorted by unit index, on every process."""
    gathered = gather_object(records) if process[1] > 1 else records
    return sorted(gathered, key=lambda record: record[0])
