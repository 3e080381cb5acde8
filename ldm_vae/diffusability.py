"""`ldm-vae diffusability`: how well an autoencoder's latent space diffuses.

For each exported autoencoder, on the same test images: the latent spectrum and scale
equivariance (evaluation/latent_space.py), the reconstruction metrics of `ldm-vae eval`,
and the **proxy generation quality**: the bundled latent diffusion model trained on the
export's latents of the train split with one fixed recipe at fixed compute
(`ProxyRecipe.steps` x `batch_size`; the UNet sized to the latent shape by
`ProxyRecipe.unet`'s rule), then `samples_per_class` samples per class: the domain Fréchet
distance (`--fd-features`) and FID where the Inception weights exist, the class accuracy of
the samples by the domain extractor's classifier, and the ratio of the samples' distance to
the reconstructions'. It trains models, so like the demo it sits above every stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .autoencoder.export import training_data
from .config import load_config
from .diffusion.config import LDMConfig
from .diffusion.latents import encode_dataset
from .diffusion.sample import generate, load_run_pipeline
from .diffusion.train import train_ldm
from .errors import UserError
from .evaluation import latent_space
from .evaluation.frechet import frechet_result, images01, reference_features
from .evaluation.latent_space import (
    latent_measures,
    markdown_table,
    save_spectrum_plot,
    update_card_section,
)
from .evaluation.report import (
    EvalOptions,
    Instruments,
    build_instruments,
    evaluate_model,
    images_key,
    load_for_comparison,
    model_labels,
)
from .files import atomic_folder, refuse_nonempty, save_image
from .run.checkpoint import complete_checkpoints

# ==============================================================================================
# Proxy generation quality
# ==============================================================================================


@dataclass
class ProxyRecipe:
    """The fixed latent diffusion recipe every autoencoder is judged by (configs/ldm_fashion.yaml
    with these settings): equal compute = equal steps x batch, whatever the latent shape."""

    steps: int = 1800
    batch_size: int = 128
    width: int = 64
    samples_per_class: int = 1000
    sample_steps: int = 20
    guidance_scale: float = 3.0
    config: str = "ldm_fashion"  # a bundled LDM config, or a path
    extra: list[str] = dataclasses.field(default_factory=list)  # more KEY=VALUE overrides of that config

    def unet(self, latent_shape: list[int]) -> list[str]:
        """The rule that sizes the UNet to the latents: halve the latent down to 4x4 (one level
        at 4x4 or less), widths [w, 2w, 2w, ...], self-attention at the coarsest level only."""
        size = latent_shape[-1]
        levels = max(1, int(math.log2(max(size, 4))) - 1)
        widths = [self.width] + [2 * self.width] * (levels - 1)
        return [f"model.block_out_channels={widths}", f"model.attention_levels=[{levels - 1}]"]

    def overrides(self, latent_shape: list[int]) -> list[str]:
        return [f"train.max_steps={self.steps}", f"train.batch_size={self.batch_size}",
                f"train.checkpoint_every={self.steps}", f"train.image_every={self.steps}",
                *self.unet(latent_shape), *self.extra]


def proxy_generation(export: Path, work: Path, recipe: ProxyRecipe, real: dict, tools: Instruments,
                     opts: EvalOptions) -> tuple[dict, torch.Tensor]:
    """Train the recipe's LDM on `export`'s latents in `work`, sample every class and measure
    the samples against the real images (`real`: Fréchet metric name -> their features);
    returns (metrics, 8 rows of samples with one column per class)."""
    device, seed = opts.device, opts.seed
    data = dataclasses.replace(training_data(export), random_flip=True)
    cache = encode_dataset(export, data, data.train_split, work / "latents", device=device)
    if not cache.get("has_labels"):
        raise UserError(f"{cache['dataset']} has no labels: the proxy LDM is class-conditional; pass --no-proxy")
    cfg = load_config(recipe.config, [f"latents={work / 'latents'}", f"seed={seed}",
                                      *recipe.overrides(cache["latent_shape"])], LDMConfig)
    run = work / "ldm"
    resumable = bool(complete_checkpoints(run))  # an interrupted measurement continues its LDM
    summary = train_ldm(cfg, run, resume="latest" if resumable else None,
                        overwrite=run.exists() and not resumable).summary
    pipe, _ = load_run_pipeline(run)
    pipe.to(device)
    num_classes = pipe.num_classes
    labels = [i % num_classes for i in range(recipe.samples_per_class * num_classes)]
    samples = generate(pipe, len(labels), labels, recipe.sample_steps, recipe.guidance_scale, seed, 250)
    m = {"ldm_steps": summary["steps"], "ldm_batch": recipe.batch_size, "ldm_final_loss":
         summary["final_logs"].get("loss"), "ldm_train_s": summary["wall_time_s"], "num_samples": len(samples),
         "unet": recipe.unet(cache["latent_shape"]), "unavailable": {}}
    m["ci95"] = {}
    for f in tools.frechet:  # rfid -> fid_samples: the samples are no reconstructions
        key = "fid_samples" if f.name == "rfid" else f"{f.name}_samples"
        result = frechet_result(real[f.name], f.features(samples), opts.bootstrap, seed, device)
        m[key], m["ci95"][key] = result["value"], result["ci95"]
    if "rfid" in tools.unavailable:
        m["unavailable"]["fid_samples"] = tools.unavailable["rfid"]
    domain = [f for f in tools.frechet if f.name.startswith("fd_")]
    if domain:
        classifier = domain[0].network.module
        with torch.no_grad():
            predicted = torch.cat([classifier.logits(samples[i:i + 500].to(device) * 2 - 1).argmax(1).cpu()
                                   for i in range(0, len(samples), 500)])
        m["class_accuracy"] = (predicted == torch.tensor(labels)).float().mean().item()
    else:
        m["unavailable"]["fd_samples"] = m["unavailable"]["class_accuracy"] = "no --fd-features extractor given"
    return m, samples[:num_classes * 8]  # 8 rows, one column per class


# ==============================================================================================
# The command
# ==============================================================================================

# what metrics.json says it measured
DEFINITIONS = (latent_space.__doc__.split("this measures:\n\n")[1].strip() + "\n- **Proxy generation quality**: "
               + " ".join(__doc__.split("**proxy generation quality**: ")[1].split("It trains models")[0].split()))


@dataclass
class DiffusabilityOptions:
    num_images: int = 2048  # test images for the spectrum, equivariance and reconstruction metrics
    batch_size: int = 256
    device: str = "cpu"
    seed: int = 0
    fd_features: str | None = None
    fid_weights: str | None = None
    bootstrap: int = 100  # resamples for each Fréchet distance's interval; 0: none
    proxy: ProxyRecipe | None = dataclasses.field(default_factory=ProxyRecipe)  # None: skip the proxy LDM


def run_diffusability(models: list[str], out: str | Path, opts: DiffusabilityOptions, split: str = "test",
                      update_card: bool = False, overwrite: bool = False) -> dict:
    """Measure each export in `models` on the same images; write metrics.json, table.md and plots."""
    out = Path(out)
    if not overwrite:
        refuse_nonempty(out)
    paths, loaded, data, dataset = load_for_comparison(models, split)
    device = torch.device(opts.device)
    labels = model_labels(paths)
    eval_opts = EvalOptions(num_images=opts.num_images, batch_size=opts.batch_size, device=opts.device,
                            fid_weights=opts.fid_weights, fd_features=opts.fd_features, bound_images=16, seed=opts.seed,
                            bootstrap=opts.bootstrap)
    tools = build_instruments(eval_opts)
    if opts.proxy:  # the samples are measured against the test images' features, which eval reuses
        real01 = images01(dataset, opts.num_images)
        key = {"images": images_key(data, split), "num_images": len(real01)}  # as evaluate_model keys them
        real = {f.name: reference_features(f.to(device), real01, key, eval_opts.reference_cache)
                for f in tools.frechet}
    work = out.parent / f".work-{out.name}"  # the proxy LDMs' latents and runs, resumable
    results = []
    with atomic_folder(out) as tmp:
        for path, label, vae in zip(paths, labels, loaded):
            folder = tmp / label
            folder.mkdir(parents=True, exist_ok=True)
            recon, _, _ = evaluate_model(vae, dataset, eval_opts, folder, tools, label, images_key(data, split))
            d = latent_measures(vae, dataset, opts.num_images, opts.batch_size, device, opts.seed)
            entry = {"model": str(path), "label": label, "kind": type(vae).__name__, "reconstruction": recon,
                     "diffusability": d}
            if opts.proxy is not None:
                gen, grid = proxy_generation(path, work / label, opts.proxy, real, tools, eval_opts)
                fd_keys = [k for k in recon if k.startswith("fd_")]
                for key in fd_keys:
                    if gen.get(f"{key}_samples") is not None and recon[key] > 0:
                        gen[f"{key}_ratio_to_reconstructions"] = gen[f"{key}_samples"] / recon[key]
                entry["generation"] = gen
                save_image(grid * 2 - 1, folder / "samples.png", nrow=len(grid) // 8)
            results.append(entry)
        save_spectrum_plot(results, tmp / "spectrum.png")
        report = {"dataset": dataset.description, "split": split, "num_images": results[0]["diffusability"][
            "num_images"], "definitions": DEFINITIONS, "frechet_protocol": tools.protocol,
            "proxy_recipe": dataclasses.asdict(opts.proxy) if opts.proxy else None, "results": results}
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2))
        table = markdown_table(results)
        (tmp / "table.md").write_text(f"# Diffusability: {dataset.description}, {split} split\n\n{table}\n\n"
                                      f"![spectrum](spectrum.png)\n")
    shutil.rmtree(work, ignore_errors=True)  # latents and LDM runs; kept only while unfinished (to resume)
    if update_card:
        for r in results:
            update_card_section(Path(r["model"]), r, report)
    report["table"] = table
    return report
