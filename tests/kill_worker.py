"""Train a config in a child process that SIGKILLs itself in the middle of one checkpoint save.

    python tests/kill_worker.py train-vae|train-ldm CONFIG OUTPUT_DIR KILL_AT_STEP [KEY=VALUE ...]

accelerate's save_state has written the models and optimizers into .tmp-checkpoint-<step>
when the process dies; the marker file and the rename never happen. Used by
tests/test_resume.py.
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

trainer, config, output_dir, kill_at, *overrides = sys.argv[1:]
original = Accelerator.save_state


def save_state(self, output_dir=None, **kwargs):
    out = original(self, output_dir, **kwargs)
    if str(output_dir).endswith(f".tmp-checkpoint-{kill_at}"):
        os.kill(os.getpid(), signal.SIGKILL)
    return out


Accelerator.save_state = save_state
run, schema = {"train-vae": (train, Config), "train-ldm": (train_ldm, LDMConfig)}[trainer]
run(load_config(config, overrides, schema), output_dir)
