"""Run under `accelerate launch`: train the tiny config, then save this rank's weights.

Used by tests/test_train.py::test_two_process_training_keeps_ranks_identical.
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

from ldm_vae.config import load_config
from ldm_vae.train_vae import train

config, output_dir, *overrides = sys.argv[1:]
summary = train(load_config(config, overrides), output_dir)
rank = summary["process_index"]
models = summary["models"]
state = {f"ae.{k}": v.contiguous() for k, v in models["ae"].state_dict().items()}
state.update({f"disc.{k}": v.contiguous() for k, v in models["disc"].state_dict().items()})
state.update({f"ema.{i}": p.contiguous() for i, p in enumerate(models["ema"].shadow_params)})
state.update({f"lecam.{k}": v.reshape(1) for k, v in models["lecam"].state_dict().items()})
save_file(state, str(Path(output_dir) / f"rank{rank}.safetensors"))
