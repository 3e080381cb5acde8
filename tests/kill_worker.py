"""Train a config in a child process that SIGKILLs itself at a chosen, reproducible point.

    python tests/kill_worker.py save|backward AT train-vae|train-ldm CONFIG OUTPUT_DIR [KEY=VALUE ...]

save AT:     in the middle of the checkpoint save of step AT: accelerate's save_state has
             written the models and optimizers into .tmp-checkpoint-AT; the marker file
             and the rename never happen.
backward AT: right after this process's AT-th backward pass, i.e. in the middle of a
             training step, before its optimizer step (counted per process, so every rank
             of a multi-process run dies at the same point).

Run it directly or as the script of `accelerate launch`. Used by tests/test_resume.py.
"""

import os
import signal
import sys

from accelerate import Accelerator

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.train import train
from ldm_vae.config import load_config
from ldm_vae.diffusion.config import LDMConfig
from ldm_vae.diffusion.train import train_ldm

mode, at, trainer, config, output_dir, *overrides = sys.argv[1:]
at = int(at)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if mode == "save":
    original_save = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        out = original_save(self, output_dir, **kwargs)
        if str(output_dir).endswith(f".tmp-checkpoint-{at}"):
            die()
        return out

    Accelerator.save_state = save_state
elif mode == "backward":
    original_backward, calls = Accelerator.backward, [0]

    def backward(self, loss, **kwargs):
        original_backward(self, loss, **kwargs)
        calls[0] += 1
        if calls[0] == at:
            die()

    Accelerator.backward = backward
else:
    sys.exit(f"unknown mode {mode!r}: save or backward")

run, schema = {"train-vae": (train, Config), "train-ldm": (train_ldm, LDMConfig)}[trainer]
run(load_config(config, overrides, schema), output_dir)
