"""Run `ldm-vae train-vae|train-ldm` in a process that is signalled at a chosen, reproducible point.

    python tests/kill_worker.py save|backward|sigterm AT train-vae|train-ldm CONFIG OUTPUT_DIR [KEY=VALUE ...]

save AT:     SIGKILL in the middle of the checkpoint save of step AT: accelerate's save_state
             has written the models and optimizers into .tmp-checkpoint-AT; the marker file
             and the rename never happen.
backward AT: SIGKILL right after this process's AT-th backward pass, i.e. in the middle of a
             training step, before its optimizer step (counted per process, so every rank
             of a multi-process run dies at the same point).
sigterm AT:  SIGTERM (a preemption notice) right after the AT-th backward pass, on the last
             rank only: the run must stop every rank at its next log step with a checkpoint.

Run it directly or as the script of `accelerate launch`; exits with the CLI's code. Used by
tests/test_resume.py.
"""

import os
import signal
import sys

from accelerate import Accelerator

from ldm_vae.cli import main

mode, at, trainer, config, output_dir, *overrides = sys.argv[1:]
at = int(at)
last_rank = os.environ.get("RANK", "0") == str(int(os.environ.get("WORLD_SIZE", "1")) - 1)


def signal_self(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)


if mode == "save":
    original_save = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        out = original_save(self, output_dir, **kwargs)
        if str(output_dir).endswith(f".tmp-checkpoint-{at}"):
            signal_self(signal.SIGKILL)
        return out

    Accelerator.save_state = save_state
elif mode in ("backward", "sigterm"):
    original_backward, calls = Accelerator.backward, [0]

    def backward(self, loss, **kwargs):
        original_backward(self, loss, **kwargs)
        calls[0] += 1
        if calls[0] == at and mode == "backward":
            signal_self(signal.SIGKILL)
        if calls[0] == at and mode == "sigterm" and last_rank:
            signal_self(signal.SIGTERM)

    Accelerator.backward = backward
else:
    sys.exit(f"unknown mode {mode!r}: save, backward or sigterm")

sys.exit(main([trainer, config, *overrides, "--output-dir", output_dir]))
