"""The `ldm-vae` command: one subcommand per stage.

Mistakes a user can fix (`UserError`) print one line and exit with code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import UserError

EPILOG = """examples:
  ldm-vae train-vae configs/kl_f4_fashion.yaml --output-dir runs/kl
  ldm-vae train-vae configs/kl_f4_fashion.yaml --output-dir runs/kl --resume latest
  ldm-vae train-vae configs/kl_f4_fashion.yaml --output-dir runs/kl2 train.max_steps=500 train.batch_size=16
  ldm-vae train-vae configs/vq_f4_fashion.yaml --output-dir runs/vq model.num_vq_embeddings=16384
  accelerate launch -m ldm_vae train-vae configs/kl_f4_fashion.yaml --output-dir runs/kl
  ldm-vae export runs/kl exports/kl
  ldm-vae export runs/vq exports/vq
"""


def _train_vae(args) -> None:
    from .config import load_config
    from .train_vae import train

    cfg = load_config(args.config, args.overrides)
    summary = train(cfg, args.output_dir, resume=args.resume)
    logging.getLogger("ldm_vae").info(
        f"trained {summary['steps']} steps in {summary['wall_time_s']} s; export: {args.output_dir}/export")


def _export(args) -> None:
    from .export import export_run

    out = export_run(args.run_dir, args.out_dir, replace=args.overwrite)
    logging.getLogger("ldm_vae").info(f"exported {args.run_dir} to {out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm-vae", description="Train, export and evaluate latent-diffusion autoencoders.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-vae", help="train a KL autoencoder or VQ tokenizer (LPIPS + PatchGAN) under Accelerate",
                       description="Train an autoencoder (model.kind: kl -> diffusers AutoencoderKL, vq -> "
                                   "VQModel with our quantizer, see configs/vq_f4_fashion.yaml). "
                                   "Runs on one process, or on many under "
                                   "`accelerate launch -m ldm_vae train-vae ...`. Writes checkpoints, "
                                   "TensorBoard logs (OUTPUT_DIR/logs), reconstruction grids "
                                   "(OUTPUT_DIR/samples) and, at the end, a diffusers export (OUTPUT_DIR/export).")
    p.add_argument("config", help="YAML config, e.g. configs/kl_f4_fashion.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of config values, e.g. train.max_steps=500 data.resolution=64")
    p.add_argument("--output-dir", required=True, help="run folder; refused if it already holds a run, unless --resume")
    p.add_argument("--resume", metavar="latest|CHECKPOINT",
                   help="continue from the newest complete checkpoint of --output-dir, or from the given folder")
    p.set_defaults(func=_train_vae)

    p = sub.add_parser("export", help="write a run's EMA weights as a diffusers folder with a model card",
                       description="Export the newest complete checkpoint of RUN_DIR as a diffusers folder "
                                   "(safetensors, measured scaling_factor (and shift_factor for KL), README.md "
                                   "model card). "
                                   "Loads with stock diffusers AutoencoderKL / VQModel.from_pretrained.")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds files")
    p.set_defaults(func=_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # KEY=VALUE overrides may also follow the options: argparse leaves those unparsed
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = args.overrides + extra
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # accelerate logs every file of every checkpoint at INFO; the trainer logs one line instead
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
    logging.getLogger("accelerate.accelerator").setLevel(logging.WARNING)
    try:
        args.func(args)
    except UserError as e:
        print(f"ldm-vae: error: {e}", file=sys.stderr)
        return 2
    return 0
