"""Run under `accelerate launch`: train a config, then save this rank's final state.

Used by the two-process tests. LDM_VAE_TEST_NAN="RANK:STEP,STEP" makes the autoencoder
loss NaN on that rank at those steps (the other ranks stay finite), to check that every
rank skips the same steps.
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from ldm_vae.config import load_config
from ldm_vae.losses import AutoencoderLoss
from ldm_vae.train_vae import train

config, output_dir, *overrides = sys.argv[1:]
if os.environ.get("LDM_VAE_TEST_NAN"):
    rank, steps = os.environ["LDM_VAE_TEST_NAN"].split(":")
    nan_steps = {int(s) for s in steps.split(",")}
    original = AutoencoderLoss.generator

    def generator(self, x, recon, latent, step, *args, **kwargs):
        loss, logs = original(self, x, recon, latent, step, *args, **kwargs)
        if os.environ.get("RANK") == rank and step in nan_steps:
            loss = loss * float("nan")
        return loss, logs

    AutoencoderLoss.generator = generator

summary = train(load_config(config, overrides), output_dir)
rank = summary["process_index"]
models = summary["models"]
state = {f"ae.{k}": v.contiguous() for k, v in models["ae"].state_dict().items()}
state.update({f"disc.{k}": v.contiguous() for k, v in models["disc"].state_dict().items()})
if models["ema"] is not None:
    state.update({f"ema.{i}": p.contiguous() for i, p in enumerate(models["ema"].shadow_params)})
state.update({f"lecam.{k}": v.reshape(1) for k, v in models["lecam"].state_dict().items()})
save_file(state, str(Path(output_dir) / f"rank{rank}.safetensors"))
