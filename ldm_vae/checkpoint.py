"""Atomic checkpoints: write to a temporary folder, rename into place when complete.

accelerate's `save_state` writes in place (and its automatic naming deletes old
checkpoints before the new one exists): a crash mid-save can leave nothing usable. Here
a checkpoint folder `checkpoint-<step>` only ever appears complete, because it is renamed
from `.tmp-checkpoint-<step>` after everything (the `trainer_state.json` marker last) is
written; old checkpoints are pruned only after that rename.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from accelerate import Accelerator

from .errors import UserError

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_checkpoint(output_dir: str | Path, which: str) -> Path:
    """`which` is 'latest' or a checkpoint folder; returns a complete checkpoint folder."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).is_file():
            raise UserError(f"{path} is not a complete checkpoint (no {STATE_FILE}); "
                            f"use --resume latest or a checkpoint-<step> folder of the run")
        return path
    found = complete_checkpoints(output_dir)
    if not found:
        raise UserError(f"no complete checkpoint in {output_dir} to resume from "
                        f"(start a new run without --resume, or point --output-dir at the run)")
    return found[-1][1]


def read_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict,
                    write_extra: Callable[[Path], None], total_limit: int) -> Path:
    """Save the full training state for `step` atomically; call on every process.

    `write_extra(folder)` runs on the main process and writes the slim parts (EMA
    autoencoder, resolved config) before the marker file.
    """
    root = Path(output_dir)
    tmp, final = root / f".tmp-checkpoint-{step}", root / f"checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))  # models, optimizers, schedulers, RNG of every process
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_extra(tmp)
        marker = tmp / STATE_FILE
        with open(marker, "w") as f:
            json.dump(state, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(root)[:-total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
