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

from ldm_vae.config import Config, LDMConfig, load_config
from ldm_vae.losses import AutoencoderLoss
from ldm_vae.train_ldm import train_ldm
from ldm_vae.train_vae import train

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
summary = run(load_config(config, overrides, schema), output_dir)
rank = summary["process_index"]
state = {}
for name, module in summary["models"].items():
    if name == "ema":
        if module is not None:
            state.update({f"ema.{i}": p.contiguous() for i, p in enumerate(module.shadow_params)})
    elif name == "lecam":
        state.update({f"lecam.{k}": v.reshape(1) for k, v in module.state_dict().items()})
    else:
        state.update({f"{name}.{k}": v.contiguous() for k, v in module.state_dict().items()})
save_file(state, str(Path(output_dir) / f"rank{rank}.safetensors"))
