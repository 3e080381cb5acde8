"""Run under `accelerate launch`: train a config, then save this rank's final state.

    ddp_worker.py train-vae|train-ldm CONFIG OUTPUT_DIR [KEY=VALUE ...]

Used by the two-process tests. LDM_VAE_TEST_NAN="RANK:STEP,STEP" makes the training loss
NaN on that rank at those steps (the other ranks stay finite), to check that every rank
skips the same steps.
"""

import os
import sys
from pathlib import Path

import torch
from diffusers import UNet2DModel
from safetensors.torch import save_file

from ldm_vae.autoencoder.config import Config
from ldm_vae.autoencoder.losses import AutoencoderLoss
from ldm_vae.autoencoder.train import train
from ldm_vae.config import load_config
from ldm_vae.diffusion.config import LDMConfig
from ldm_vae.diffusion.train import train_ldm

trainer, config, output_dir, *overrides = sys.argv[1:]
if os.environ.get("LDM_VAE_TEST_NAN"):
    rank, steps = os.environ["LDM_VAE_TEST_NAN"].split(":")
    nan_steps = {int(s) for s in steps.split(",")}
    mine = os.environ.get("RANK") == rank
    if trainer == "train-vae":
        original = AutoencoderLoss.generator

        def generator(self, x, recon, latent, step, *args, **kwargs):
            loss, logs = original(self, x, recon, latent, step, *args, **kwargs)
            return (loss * float("nan") if mine and step in nan_steps else loss), logs

        AutoencoderLoss.generator = generator
    else:  # one training forward per step (no accumulation): count them
        original_forward, calls = UNet2DModel.forward, [0]

        def forward(self, *args, **kwargs):
            out = original_forward(self, *args, **kwargs)
            if self.training and torch.is_grad_enabled():
                if mine and calls[0] in nan_steps:
                    out.sample = out.sample * float("nan")
                calls[0] += 1
            return out

        UNet2DModel.forward = forward

run, schema = {"train-vae": (train, Config), "train-ldm": (train_ldm, LDMConfig)}[trainer]
result = run(load_config(config, overrides, schema), output_dir)
modules = {"ae": result.autoencoder, "disc": result.discriminator, "lecam": result.lecam} \
    if trainer == "train-vae" else {"unet": result.unet}
state = {f"{name}.{k}": v.reshape(-1).contiguous() for name, module in modules.items()
         for k, v in module.state_dict().items()}
if result.ema is not None:
    state.update({f"ema.{i}": p.contiguous() for i, p in enumerate(result.ema.shadow_params)})
save_file(state, str(Path(output_dir) / f"rank{result.process_index}.safetensors"))
