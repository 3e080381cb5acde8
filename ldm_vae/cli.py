"""The `ldm-vae` command: one subcommand per stage.

Mistakes a user can fix (`UserError`) print one line and exit with code 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from .errors import EXIT_PREEMPTED, Preempted, UserError

EPILOG = """examples:
  ldm-vae train-vae configs/kl_f4_fashion.yaml --output-dir runs/kl
  ldm-vae train-vae configs/kl_f4_fashion.yaml --output-dir runs/kl --resume latest
  ldm-vae train-vae configs/kl_f4_fashion.yaml --output-dir runs/kl2 train.max_steps=500 train.batch_size=16
  ldm-vae train-vae configs/vq_f4_fashion.yaml --output-dir runs/vq model.num_vq_embeddings=16384
  accelerate launch -m ldm_vae train-vae configs/kl_f4_fashion.yaml --output-dir runs/kl
  ldm-vae export runs/kl exports/kl
  ldm-vae export runs/vq exports/vq
  ldm-vae eval exports/kl --split test --num-images 10000 --out reports/kl
  ldm-vae eval exports/kl exports/vq --data fashion-mnist --out reports/compare --fd-features features/fashion
  ldm-vae train-fd-features --data fashion-mnist --out features/fashion
  ldm-vae diffusability exports/kl exports/kl_eq --fd-features features/fashion --out reports/diffuse
  ldm-vae encode exports/kl --split train --out latents/kl
  ldm-vae train-ldm configs/ldm_fashion.yaml --latents latents/kl --output-dir runs/ldm
  ldm-vae sample runs/ldm --num-images 64 --class-label 3 --guidance-scale 3 --steps 50 --out samples/
  ldm-vae export-pipeline runs/ldm pipelines/fashion
  ldm-vae train-ldm configs/ldm_fashion.yaml network=dit --latents latents/kl --output-dir runs/dit
  ldm-vae export-pipeline runs/dit pipelines/fashion-dit --push-to-hub USER/fashion-dit   # stock DiTPipeline
  ldm-vae demo                       # all of the above on Fashion-MNIST, report in demo/REPORT.md
  ldm-vae train-vae kl_f4_fashion --output-dir runs/kl   # a bundled config by name (no checkout needed)
"""


def _train_vae(args) -> None:
    from .autoencoder.config import Config
    from .autoencoder.train import train
    from .config import load_config

    cfg = load_config(args.config, args.overrides, Config)
    summary = train(cfg, args.output_dir, resume=args.resume, overwrite=args.overwrite).summary
    logging.getLogger("ldm_vae").info(
        f"trained {summary['steps']} steps in {summary['wall_time_s']} s; export: {args.output_dir}/export")


def _export(args) -> None:
    from .autoencoder.export import export_run
    from .hub import check_repo_id, push_folder

    check_repo_id(args.push_to_hub, args.private)
    out = export_run(args.run_dir, args.out_dir, replace=args.overwrite, repo_id=args.push_to_hub, step=args.step)
    logging.getLogger("ldm_vae").info(f"exported {args.run_dir} to {out}")
    if args.push_to_hub:
        logging.getLogger("ldm_vae").info(f"pushed {out} to {push_folder(out, args.push_to_hub, args.private)}")


def _eval(args) -> None:
    from .evaluation.report import EvalOptions, run_eval

    device = _device(args)
    opts = EvalOptions(num_images=args.num_images or None, batch_size=args.batch_size, device=device,
                       lpips_weights={"vgg": args.lpips_vgg_weights, "alex": args.lpips_alex_weights},
                       fid_weights=args.fid_weights, fd_features=args.fd_features, iwae_k=args.iwae_k,
                       bound_images=args.bound_images, likelihood_sigma=args.likelihood_sigma, seed=args.seed,
                       bootstrap=args.bootstrap)
    report = run_eval(args.models, args.out, opts, split=args.split, source=args.data, data_path=args.data_path,
                      data_name=args.data_name, resolution=args.resolution, update_card=args.update_card,
                      overwrite=args.overwrite)
    if report is not None:  # the main process's (under accelerate launch)
        print(f"{report['dataset']}, {report['split']} split, {report['num_images']} images\n\n{report['table']}\n")
        logging.getLogger("ldm_vae").info(f"wrote {args.out}/metrics.json and pictures")


def _diffusability(args) -> None:
    from .diffusability import DiffusabilityOptions, ProxyRecipe, run_diffusability

    recipe = None if args.no_proxy else ProxyRecipe(
        steps=args.ldm_steps, batch_size=args.ldm_batch_size, width=args.ldm_width,
        samples_per_class=args.samples_per_class, sample_steps=args.sample_steps,
        guidance_scale=args.guidance_scale, config=args.ldm_config)
    opts = DiffusabilityOptions(num_images=args.num_images, batch_size=args.batch_size, device=_device(args),
                                seed=args.seed, fd_features=args.fd_features, fid_weights=args.fid_weights,
                                bootstrap=args.bootstrap, proxy=recipe)
    report = run_diffusability(args.models, args.out, opts, split=args.split, update_card=args.update_card,
                               overwrite=args.overwrite)
    print(f"{report['dataset']}, {report['split']} split, {report['num_images']} images\n\n{report['table']}\n")
    logging.getLogger("ldm_vae").info(f"wrote {args.out}/metrics.json, table.md and spectrum.png")


def _train_fd_features(args) -> None:
    from .config import from_dict
    from .data.config import DataConfig
    from .evaluation.features import train_fd_features

    given = {"source": args.data, "path": args.data_path, "name": args.data_name, "resolution": args.resolution}
    data = from_dict({k: v for k, v in given.items() if v is not None}, "the data options", DataConfig)
    device = _device(args)
    meta = train_fd_features(data, args.out, args.name or args.data.replace("-", "_"), steps=args.steps,
                             batch_size=args.batch_size, device=device, seed=args.seed, overwrite=args.overwrite)
    logging.getLogger("ldm_vae").info(f"saved {args.out}: fd_{meta['name']} features, test accuracy "
                                      f"{meta['test_accuracy']:.2%}")


def _encode(args) -> None:
    from .autoencoder.export import training_data
    from .diffusion.latents import encode_dataset

    data = training_data(args.model, args.data, args.data_path, args.data_name, args.resolution)
    if args.no_flip:
        data.random_flip = False
    device = _device(args)
    if args.batch_size < 1 or args.shard_size < 1:
        raise UserError("--batch-size and --shard-size must be at least 1")
    meta = encode_dataset(args.model, data, args.split, args.out, batch_size=args.batch_size,
                          shard_size=args.shard_size, device=device, overwrite=args.overwrite)
    _main_log(f"{args.out}: {meta['num_images']} latents {meta['latent_shape']} of "
              f"{meta['dataset']}{' (+ flipped twins)' if meta['flipped'] else ''}")


def _train_ldm(args) -> None:
    from .config import load_config
    from .diffusion.config import LDMConfig
    from .diffusion.train import train_ldm

    overrides = list(args.overrides) + ([f"latents={args.latents}"] if args.latents else [])
    cfg = load_config(args.config, overrides, LDMConfig)
    summary = train_ldm(cfg, args.output_dir, resume=args.resume, overwrite=args.overwrite).summary
    logging.getLogger("ldm_vae").info(f"trained {summary['steps']} steps in {summary['wall_time_s']} s; samples in "
                                      f"{args.output_dir}/samples")


def _sample(args) -> None:
    from .diffusion.sample import load_pipeline, sample_conditions, write_samples
    from .files import refuse_nonempty

    out = Path(args.out)
    if not args.overwrite:
        refuse_nonempty(out)
    if args.num_images < 1 or args.steps < 1 or args.batch_size < 1:
        raise UserError("--num-images, --steps and --batch-size must be at least 1")
    pipe = load_pipeline(args.model, args.solver)
    pipe.to(_device(args))
    labels = sample_conditions(pipe, args.class_label, args.prompt, args.num_images)
    write_samples(pipe, args.num_images, labels, args.steps, args.guidance_scale, args.seed, args.batch_size, out,
                  nrow=args.nrow or min(args.num_images, 10))
    _main_log(f"wrote {args.num_images} samples and grid.png to {out}")


def _export_pipeline(args) -> None:
    from .diffusion.export import export_pipeline
    from .hub import check_repo_id, push_folder

    check_repo_id(args.push_to_hub, args.private)
    out = export_pipeline(args.run_dir, args.out_dir, overwrite=args.overwrite, repo_id=args.push_to_hub)
    index = json.loads((out / "model_index.json").read_text())
    logging.getLogger("ldm_vae").info(f"exported {args.run_dir} to {out}; load it with stock diffusers: "
                                      f"{index['_class_name']}.from_pretrained('{out}')")
    if args.push_to_hub:
        logging.getLogger("ldm_vae").info(f"pushed {out} to {push_folder(out, args.push_to_hub, args.private)}")


def _demo(args) -> None:
    from .demo import run_demo

    report = run_demo(Path(args.out), quick=args.quick, overwrite=args.overwrite, data_path=args.data_path)
    logging.getLogger("ldm_vae").info(f"demo finished: {report}")


def _device(args) -> str:
    """--device; else this process's GPU under `accelerate launch` (cuda:LOCAL_RANK), cuda on one
    process with a GPU, cpu without."""
    import torch

    from .run.processes import process_state

    return args.device or (str(process_state().device) if torch.cuda.is_available() else "cpu")


def _main_log(message: str) -> None:
    """Log once, from the main process, under `accelerate launch` as without."""
    from .run.processes import process_state

    if process_state().is_main_process:
        logging.getLogger("ldm_vae").info(message)


def _add_bootstrap_arg(p) -> None:
    p.add_argument("--bootstrap", type=int, default=100, metavar="N",
                   help="resamples for the 95%% interval of every Frechet distance (0: none). Each costs two "
                        "eigendecompositions of the feature covariance, on --device: milliseconds for a 128-d "
                        "domain extractor; for rFID's 2048-d features under a second on a GPU but about 30 s on a "
                        "2-core CPU (pass 10-20 or 0 there). The real images' features are cached under "
                        "$LDM_VAE_CACHE (default ~/.cache/ldm-vae) and reused by later runs on the same images")


def _add_data_args(p, source_default=None) -> None:
    from .data.config import SOURCES

    p.add_argument("--data", default=source_default, choices=SOURCES,
                   help="data source" + ("" if source_default else " (default: the model's training data)"))
    p.add_argument("--data-path", help="fashion-mnist idx folder or image folder")
    p.add_argument("--data-name", help="hub dataset name (needs internet)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available; under accelerate launch, "
                                     "each process its own GPU, in the commands that run there)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")


def _add_run_args(p, config_example: str, overrides_example: str) -> None:
    """What both trainers take: config, overrides and the run folder's flags."""
    # imported here, like every command's modules; light (yaml only); the list follows the configs
    from .config import bundled_configs

    p.add_argument("config", help=f"YAML config file, e.g. {config_example}, or the name of a config bundled with "
                                  f"ldm-vae ({', '.join(bundled_configs())})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help=f"dotted overrides of config values, e.g. {overrides_example}")
    p.add_argument("--output-dir", required=True, help="run folder; refused if it already holds a run, unless --resume")
    p.add_argument("--resume", metavar="latest|CHECKPOINT",
                   help="continue from the newest complete checkpoint of --output-dir, or from the given folder")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a run already in --output-dir and start afresh (checked inputs first)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ldm-vae", description="Train, export and evaluate latent-diffusion autoencoders, and train, sample "
                    "and export latent diffusion models on their latents.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train-vae", help="train a KL or DC autoencoder or a VQ/FSQ/LFQ tokenizer (LPIPS + PatchGAN) "
                                         "under Accelerate",
                       description="Train an autoencoder (model.kind: kl -> diffusers AutoencoderKL; vq -> "
                                   "VQModel with our quantizer, see configs/vq_f4_fashion.yaml; fsq, lfq -> VQModel "
                                   "whose codebook is the fixed grid, see configs/fsq_f4_fashion.yaml and "
                                   "configs/lfq_f4_fashion.yaml; dc -> AutoencoderDC, see "
                                   "configs/dc_f8_fashion.yaml). "
                                   "Runs on one process, or on many under "
                                   "`accelerate launch -m ldm_vae train-vae ...`. Writes checkpoints, "
                                   "TensorBoard logs (OUTPUT_DIR/logs), reconstruction grids "
                                   "(OUTPUT_DIR/samples) and, at the end, a diffusers export (OUTPUT_DIR/export).")
    _add_run_args(p, "configs/kl_f4_fashion.yaml", "train.max_steps=500 data.resolution=64")
    p.set_defaults(func=_train_vae)

    p = sub.add_parser("export", help="write a run's EMA weights as a diffusers folder with a model card",
                       description="Export the newest complete checkpoint of RUN_DIR (or, with --step, an older "
                                   "one) as a diffusers folder (safetensors, measured scaling_factor (and "
                                   "shift_factor for KL), README.md model card). "
                                   "Loads with stock diffusers AutoencoderKL / VQModel / "
                                   "AutoencoderDC.from_pretrained.")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--step", type=int, metavar="N", help="export the checkpoint saved at step N instead of the "
                                                         "newest (RUN_DIR/checkpoint-N; e.g. to evaluate how a "
                                                         "run improved)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds files")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload OUT_DIR to this Hugging Face Hub model "
                                                            "repo (created if new; the card's snippets name it)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(func=_export)

    p = sub.add_parser("eval", help="PSNR, SSIM, LPIPS, rFID, codebook usage, pictures and VAE diagnostics",
                       description="Evaluate one or more exported autoencoders (diffusers folders) on the same "
                                   "images: writes OUT/metrics.json, reconstruction grids, error heatmaps, a code "
                                   "usage histogram (VQ), interpolation / prior-sample grids and likelihood bounds "
                                   "(KL), and with several models OUT/comparison.md. Metrics whose weights are "
                                   "missing are reported as unavailable with the reason. Under `accelerate launch` "
                                   "the batches are dealt out to the processes and every metric is the one a single "
                                   "process computes (the likelihood bounds and pictures stay on the main process).")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="export folder(s), e.g. runs/kl/export")
    p.add_argument("--out", required=True, help="report folder (refused if not empty, unless --overwrite)")
    p.add_argument("--split", default="test")
    p.add_argument("--num-images", type=int, default=0, help="first N images of the split (0: all)")
    p.add_argument("--resolution", type=int, help="default: the model's training resolution")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lpips-vgg-weights", metavar="PATH", help="vgg16-397923af.pth (default: torch hub cache)")
    p.add_argument("--lpips-alex-weights", metavar="PATH", help="alexnet-owt-7be5be79.pth (default: torch hub cache)")
    p.add_argument("--fid-weights", metavar="PATH",
                   help="torch-fidelity's FID Inception weights, weights-inception-2015-12-05-6726825d.pth "
                        "(default: the torch hub cache)")
    p.add_argument("--fd-features", metavar="PATH",
                   help="feature extractor folder from `ldm-vae train-fd-features`: adds its Frechet distance")
    _add_bootstrap_arg(p)
    p.add_argument("--iwae-k", type=int, default=16, help="KL: importance samples of the IWAE bound")
    p.add_argument("--bound-images", type=int, default=256,
                   help="KL: images for the ELBO / IWAE bounds; each costs --iwae-k + 1 decodes, so on a CPU "
                        "they dominate a small evaluation (lower it to save time; 0 skips them)")
    p.add_argument("--likelihood-sigma", type=float, default=0.1,
                   help="KL: std of the Gaussian decoder likelihood on [-1, 1] pixels used by the bounds")
    p.add_argument("--update-card", action="store_true",
                   help="write the results into each model's README.md (model-index metadata and a table)")
    p.add_argument("--seed", type=int, default=0, help="posterior samples, bound estimates, prior samples")
    _add_data_args(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("diffusability", help="how well latent spaces diffuse: latent spectrum, scale equivariance, "
                                             "and a proxy LDM's samples",
                       description="Measure exported autoencoders on the same images: the latent power spectrum "
                                   "and its high-frequency share next to the images' (Skorokhodov et al. 2025, "
                                   "arXiv:2502.14831), scale equivariance of decoder and encoder, reconstruction "
                                   "metrics, and (unless --no-proxy) the samples of a latent diffusion model "
                                   "trained on each model's latents with one fixed recipe at fixed compute: domain "
                                   "Frechet distance (--fd-features), FID where its weights exist, class accuracy "
                                   "and the ratio of the samples' distance to the reconstructions'. Writes "
                                   "OUT/metrics.json, OUT/table.md, OUT/spectrum.png and per-model pictures. The "
                                   "definitions are in metrics.json and the README.")
    p.add_argument("models", nargs="+", metavar="MODEL_DIR", help="export folder(s) trained on the same data")
    p.add_argument("--out", required=True, help="report folder (refused if not empty, unless --overwrite)")
    p.add_argument("--split", default="test", help="images measured (the proxy LDM trains on the train split)")
    p.add_argument("--num-images", type=int, default=2048, help="first N images of --split")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--fd-features", metavar="PATH", help="extractor from `ldm-vae train-fd-features` (domain FD "
                                                         "and class accuracy of the samples)")
    p.add_argument("--fid-weights", metavar="PATH", help="FID Inception weights (default: torch hub cache)")
    _add_bootstrap_arg(p)
    p.add_argument("--no-proxy", action="store_true", help="skip the proxy LDM (spectrum and equivariance only)")
    p.add_argument("--ldm-config", default="ldm_fashion", help="the proxy LDM's config (bundled name or path)")
    p.add_argument("--ldm-steps", type=int, default=1800, help="proxy LDM steps (equal for every model)")
    p.add_argument("--ldm-batch-size", type=int, default=128, help="proxy LDM batch (equal for every model)")
    p.add_argument("--ldm-width", type=int, default=64,
                   help="UNet width w: levels down to 4x4 latents, widths [w, 2w, 2w, ...], attention at the last")
    p.add_argument("--samples-per-class", type=int, default=1000)
    p.add_argument("--sample-steps", type=int, default=20, help="DPM-Solver++ steps")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--update-card", action="store_true", help="add a Diffusability section to each model card")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available; under accelerate launch, "
                                     "each process its own GPU, in the commands that run there)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it holds files")
    p.set_defaults(func=_diffusability)

    p = sub.add_parser("encode", help="cache a dataset split's latents (for latent diffusion training)",
                       description="Encode a dataset split once with an exported autoencoder into safetensors "
                                   "shards (KL: posterior mean and std; VQ: pre-quantization latents; labels; "
                                   "flipped twins when the data flips). Idempotent: a finished cache is reused, "
                                   "an interrupted one is completed. Under `accelerate launch` the shards are dealt "
                                   "out to the processes; the cache is the one a single process writes.")
    p.add_argument("model", metavar="MODEL_DIR", help="export folder, e.g. runs/kl/export")
    p.add_argument("--out", required=True, help="cache folder, e.g. latents/kl")
    p.add_argument("--split", default="train")
    p.add_argument("--resolution", type=int, help="default: the model's training resolution")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--shard-size", type=int, default=10_000,
                   help="images per shard file: the unit an interrupted encode resumes from, and the unit of work "
                        "that `accelerate launch -m ldm_vae encode ...` deals out to its processes (at least one "
                        "shard per process to use them all)")
    p.add_argument("--no-flip", action="store_true", help="do not store flipped twins")
    _add_data_args(p)
    p.set_defaults(func=_encode)

    p = sub.add_parser("train-ldm", help="train a latent diffusion UNet or DiT on a latent cache under Accelerate",
                       description="Train a diffusers UNet2DModel (or DiTTransformer2DModel: network=dit) on the "
                                   "latents cached by `ldm-vae encode` (DDPM "
                                   "noise schedule, epsilon or v prediction, optional class conditioning with label "
                                   "dropout for classifier-free guidance, EMA). Same checkpoints, --resume and logs "
                                   "as train-vae; a sample grid (one row per class) every train.image_every steps "
                                   "in OUTPUT_DIR/samples.")
    _add_run_args(p, "configs/ldm_fashion.yaml", "train.max_steps=500 sample.guidance_scale=2")
    p.add_argument("--latents", help="latent cache folder from `ldm-vae encode` (sets the config's `latents`)")
    p.set_defaults(func=_train_ldm)

    p = sub.add_parser("sample", help="generate images from a train-ldm run or an exported pipeline",
                       description="Sample with the EMA network of a train-ldm run (newest checkpoint) or an exported "
                                   "pipeline folder; writes OUT/sample_NNNNN.png and OUT/grid.png (the first 100). "
                                   "Each image's noise has its own seed, from (--seed, its index): an image depends "
                                   "on those and on its batch (--batch-size), not on the number of processes. "
                                   "`accelerate launch -m ldm_vae sample ...` splits the batches over processes "
                                   "(leave --device out: each process takes its own GPU).")
    p.add_argument("model", metavar="RUN_OR_PIPELINE", help="train-ldm run folder or export-pipeline folder")
    p.add_argument("--out", required=True, help="folder for the PNGs (refused if not empty, unless --overwrite)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--class-label", type=int, action="append",
                   help="class of the images (repeat for several, cycled); default: every class in turn (a "
                        "text-to-image model trained on class templates: the prompt 'a photo of a {class}')")
    p.add_argument("--prompt", action="append", help="text-to-image models: the prompt of the images (repeat for "
                                                     "several, cycled)")
    p.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance; 1 or less = none")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (DPM-Solver++: 20, DDIM: 50)")
    p.add_argument("--solver", choices=("dpm++", "ddim"), help="default: the run's sample.solver / dpm++")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--nrow", type=int, help="images per row of grid.png (default: 10)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda if available; under accelerate launch, "
                                     "each process its own GPU, in the commands that run there)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=_sample)

    p = sub.add_parser("export-pipeline", help="write a train-ldm run as a diffusers pipeline folder",
                       description="Write the newest checkpoint of RUN_DIR (EMA network), its autoencoder (its "
                                   "shift folded into its biases) and a DPM-Solver++ scheduler as a diffusers "
                                   "pipeline folder with a model card, loaded by a stock diffusers class (no "
                                   "trust_remote_code): a class-conditional run (UNet or DiT) by "
                                   "DiTPipeline.from_pretrained(OUT_DIR), an unconditional one by "
                                   "LDMPipeline.from_pretrained(OUT_DIR).")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it already holds files")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload OUT_DIR to this Hugging Face Hub model "
                                                            "repo (created if new; the card's snippets name it)")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.set_defaults(func=_export_pipeline)

    p = sub.add_parser("demo", help="the whole path on Fashion-MNIST, end to end, with a report",
                       description="Train a KL-VAE, export and evaluate it, encode the training split, train a "
                                   "class-conditional LDM, sample every class, measure Frechet distances in a "
                                   "domain feature space, export the pipeline, and write OUT/REPORT.md with "
                                   "pictures, metrics and the time of each stage (about 50 minutes on 2 CPU "
                                   "cores; --quick: about a minute, for smoke checks).")
    p.add_argument("--out", default="demo", help="demo folder (default: demo)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps: checks the path, not quality")
    p.add_argument("--data-path", help="Fashion-MNIST idx folder (default: the Debian package, else the hub)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo in --out")
    p.set_defaults(func=_demo)

    p = sub.add_parser("train-fd-features", help="train a small classifier whose features give a domain "
                                                 "Frechet distance (for --fd-features)",
                       description="Train a small CNN classifier on a labelled dataset and save it (feature "
                                   "layer and classifier) as a safetensors folder, for `ldm-vae eval --fd-features`. Reported as fd_NAME, not FID.")
    p.add_argument("--out", required=True, help="folder to write (safetensors + config.json), e.g. features/fashion")
    p.add_argument("--name", help="metric name suffix (default: the data source, e.g. fashion_mnist)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    _add_data_args(p, "fashion-mnist")
    p.set_defaults(func=_train_fd_features)
    return parser


# the commands that split their work over the processes of `accelerate launch`
MANY_PROCESSES = {_train_vae: "train-vae", _train_ldm: "train-ldm", _encode: "encode", _eval: "eval",
                  _sample: "sample"}


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
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.func not in MANY_PROCESSES:
            raise UserError(f"`ldm-vae {args.command}` runs in one process: run it without `accelerate launch` (the "
                            f"commands that use many processes: {', '.join(sorted(MANY_PROCESSES.values()))})")
        args.func(args)
    except UserError as e:
        print(f"ldm-vae: error: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"ldm-vae: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    return 0
