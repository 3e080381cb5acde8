"""Atomic checkpoints: write to a temporary folder, rename into place when complete.

accelerate's `save_state` writes in place (and its automatic naming deletes old
checkpoints before the new one exists): a crash mid-save can leave nothing usable. Here
a checkpoint folder `checkpoint-<step>` only ever appears complete, because it is renamed
from `.tmp-checkpoint-<step>` after everything (the `trainer_state.json` marker last) is
written; old checkpoints are pruned only after that rename.

Loading never unpickles code: accelerate reads models from safetensors and optimizer,
sampler and RNG files with `weights_only=True`; the trainer's own extra state (schedulers,
EMA, LeCam) is saved by us and read with `weights_only=True` too, because accelerate loads
objects registered with `register_for_checkpointing` with `weights_only=False`.
accelerate reads each process's RNG file inside `try/except Exception` and goes on
silently when it cannot (a tampered, truncated or missing file): the resume would no
longer be identical. We refuse that instead (`_check_rng_restored`).

Files rot: the marker records the sha256 of every file of the checkpoint. `--resume latest`
skips a checkpoint whose files no longer match (with a warning) and takes the newest intact
one; a checkpoint named explicitly, and the one `export` and `sample` read, is refused.
Checkpoints from before the checksums load unverified.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load

from ..errors import UserError
from ..files import disk_full, sha256, write_failed

logger = logging.getLogger(__name__)
STATE_FILE = "trainer_state.json"
EXTRA_FILE = "trainer_extra.pt"
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


def find_checkpoint(output_dir: str | Path, which: str, skip_corrupt: bool = False) -> Path:
    """`which` is 'latest' or a checkpoint folder; returns a complete checkpoint folder whose
    files match their checksums. A corrupt one is refused, or, for 'latest' with
    `skip_corrupt` (resuming), passed over with a warning for the newest intact one."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).is_file():
            raise UserError(f"{path} is not a complete checkpoint (no {STATE_FILE}); "
                            f"use --resume latest or a checkpoint-<step> folder of the run")
        _refuse_corrupt(path)
        return path
    found = complete_checkpoints(output_dir)
    if not found:
        raise UserError(f"no complete checkpoint in {output_dir} to resume from "
                        f"(start a new run without --resume, or point --output-dir at the run)")
    if not skip_corrupt:
        _refuse_corrupt(found[-1][1])
        return found[-1][1]
    for _, path in reversed(found):
        problem = corruption(path)
        if problem is None:
            return path
        logger.warning(f"skipping {path}: {problem}")
    raise UserError(f"every checkpoint in {output_dir} is corrupt (see the warnings above); restore one from a "
                    f"backup or start a new run")


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` (but the marker), by relative path."""
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != STATE_FILE}


def corruption(checkpoint: Path) -> str | None:
    """What is wrong with the checkpoint's files (missing, or not the bytes that were saved),
    or None (also for checkpoints written before checksums were recorded)."""
    try:
        recorded = read_state(checkpoint).get("checksums")
    except (OSError, ValueError) as err:
        return f"its {STATE_FILE} is unreadable ({err.__class__.__name__})"
    if recorded is None:
        return None
    missing = [name for name in recorded if not (checkpoint / name).is_file()]
    if missing:
        return f"{', '.join(missing)} missing"
    changed = [name for name, digest in recorded.items() if sha256(checkpoint / name) != digest]
    return f"{', '.join(changed)} changed since it was saved (truncated or corrupt)" if changed else None


def _refuse_corrupt(checkpoint: Path) -> None:
    problem = corruption(checkpoint)
    if problem is not None:
        raise UserError(f"{checkpoint} is corrupt: {problem}; use an earlier checkpoint-<step> folder of the run "
                        f"(or --resume latest, which skips corrupt ones)")


def read_state(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def _refuse(path: Path, err: Exception) -> UserError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
    return UserError(f"refusing to load {path}: it holds something other than tensors and plain data, which could "
                     f"run code when unpickled ({reason[:200]}); the checkpoint is damaged or was not written by "
                     f"ldm-vae; resume from another checkpoint-<step> folder")


def safe_load(path: str | Path):
    """torch.load with weights_only=True: tensors and plain containers (and numpy arrays, which
    RNG states hold), never objects or code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing: the checkpoint is incomplete; resume from another checkpoint-<step> "
                        f"folder")
    try:
        return accelerate_load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise _refuse(path, err) from None
    except (OSError, RuntimeError, EOFError) as err:
        raise UserError(f"cannot read {path} ({err.__class__.__name__}: {err}); the checkpoint is damaged; "
                        f"resume from another checkpoint-<step> folder") from None


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, objects: dict) -> int:
    """Restore accelerate's state (models, optimizers, RNG of every process) and `objects`
    (name -> object with load_state_dict) from `checkpoint`; returns its step."""
    try:
        accelerator.load_state(str(checkpoint))
    except pickle.UnpicklingError as err:
        raise _refuse(checkpoint, err) from None
    _check_rng_restored(checkpoint / f"random_states_{accelerator.process_index}.pkl")
    extra = safe_load(checkpoint / EXTRA_FILE)
    missing = sorted(set(objects) - set(extra))
    if missing:
        raise UserError(f"{checkpoint / EXTRA_FILE} lacks {', '.join(missing)}; it was written by a run with "
                        f"another configuration; resume with the run's own config.yaml")
    for name, obj in objects.items():
        obj.load_state_dict(extra[name])
    return read_state(checkpoint)["step"]


def _check_rng_restored(path: Path) -> None:
    """Right after `load_state`: this process's RNG must now be the one saved in `path`.
    accelerate swallows any failure to read or apply that file, and a resume with the
    wrong RNG draws other noise and augmentations, silently."""
    states = safe_load(path)  # a tampered or damaged file is refused here, with its reason
    try:
        restored = (torch.equal(torch.get_rng_state(), states["torch_manual_seed"])
                    and random.getstate() == states["random_state"])
    except (KeyError, TypeError):
        restored = False
    if not restored:
        raise UserError(f"{path} does not hold this process's random state as ldm-vae saves it, so the run cannot "
                        f"resume identically; the checkpoint is damaged or was not written by ldm-vae; resume from "
                        f"another checkpoint-<step> folder")


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, step: int, state: dict,
                    write_extra: Callable[[Path], None], total_limit: int, objects: dict) -> Path:
    """Save the full training state for `step` atomically; call on every process.

    `objects` (name -> object with state_dict, identical on every process) go to
    trainer_extra.pt; `write_extra(folder)` runs on the main process and writes the slim
    parts (EMA autoencoder, resolved config). The marker file comes last.
    """
    root = Path(output_dir)
    tmp, final = root / f".tmp-checkpoint-{step}", root / f"checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))  # models, optimizers, schedulers, RNG of every process
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            torch.save({name: obj.state_dict() for name, obj in objects.items()}, tmp / EXTRA_FILE)
            write_extra(tmp)
            marker = tmp / STATE_FILE
            with open(marker, "w") as f:
                json.dump({**state, "checksums": checksums(tmp)}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
    except Exception as err:
        if not disk_full(err, tmp):
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # without its marker it is never picked, but it holds space
        kept = complete_checkpoints(root)
        raise write_failed(tmp, err, f"{kept[-1][1] if kept else 'no earlier checkpoint'} is kept; free space, then "
                                     f"continue with --resume latest") from err
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in complete_checkpoints(root)[:-total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
