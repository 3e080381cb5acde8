"""Text-to-image latent diffusion (diffusion.conditioning: text): a UNet2DConditionModel and
its CLIP text encoder trained together on captions, exported as a stock
StableDiffusionPipeline that generates what `ldm-vae sample` generates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ldm_vae.diffusion.export import export_pipeline
from ldm_vae.diffusion.sample import (
    generate,
    image_generators,
    load_pipeline,
    sample_conditions,
)
from ldm_vae.diffusion.text import CAPTION_TEMPLATES, class_prompt
from ldm_vae.diffusion.train import train_ldm
from ldm_vae.errors import UserError
from ldm_vae.run.processes import derived_seed

TEXT = ("diffusion.conditioning=text", "text.hidden_size=32", "text.num_heads=2", "text.num_layers=1")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_cache):
    from ldm_vae.config import load_config
    from ldm_vae.diffusion.config import LDMConfig

    from .conftest import TINY_LDM

    out = tmp_path_factory.mktemp("text") / "run"
    cfg = load_config(TINY_LDM, [f"latents={tiny_cache}", *TEXT, "train.max_steps=40", "train.log_every=10",
                                 "train.image_every=40", "train.checkpoint_every=40"], LDMConfig)
    return out, train_ldm(cfg, out)


def test_text_to_image_trains_and_its_export_is_a_stock_stable_diffusion_pipeline(text_run, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out, run = text_run
    losses = [json.loads(line)["loss"] for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < 0.85 * losses[0], losses
    assert (out / "samples" / "samples_0000040.png").is_file()  # the preview, through StableDiffusionPipeline
    assert isinstance(run.unet.unet, UNet2DConditionModel) and run.unet.unet.config.cross_attention_dim == 32
    export_pipeline(out, tmp_path / "pipe")
    stock = StableDiffusionPipeline.from_pretrained(str(tmp_path / "pipe"))
    assert type(stock) is StableDiffusionPipeline and stock.safety_checker is None
    assert stock.vae.config.shift_factor == 0  # folded in: the pipeline ignores a shift
    prompts = [class_prompt("Dress"), class_prompt("Dress"), "a picture of a sneaker", class_prompt("Bag")]
    assert prompts[0] == "a photo of a dress"
    theirs = stock(prompts, num_inference_steps=5, guidance_scale=3.0, generator=image_generators(7, range(4)),
                   output_type="pt").images
    for source in (out, tmp_path / "pipe"):  # ldm-vae's pipeline of the run, and of the folder
        pipe = load_pipeline(source)
        torch.testing.assert_close(generate(pipe, 4, prompts, 5, 3.0, 7, 4, progress=False), theirs,
                                   atol=1e-5, rtol=0)
        # a class label is its class's first template, the prompt the model trained on
        assert pipe.num_classes == 10
        by_label = generate(pipe, 4, sample_conditions(pipe, [3, 3, 7, 8], None, 4), 5, 3.0, 7, 4, progress=False)
        torch.testing.assert_close(by_label[:2], theirs[:2], atol=1e-5, rtol=0)
    # and in a Python where ldm_vae cannot be imported, outside the repository
    code = """
import sys
sys.modules["ldm_vae"] = None  # any `import ldm_vae...` now raises ImportError
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
image = pipe(["a photo of a dress"], num_inference_steps=5, guidance_scale=3.0,
             generator=torch.Generator().manual_seed(int(sys.argv[3])), output_type="pt").images
torch.save(image, sys.argv[2])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pipe"), str(tmp_path / "image.pt"),
                           str(derived_seed(7, 0))],  # image 0's seed of `ldm-vae sample --seed 7`
                          cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(tmp_path / "image.pt", weights_only=True), theirs[:1], atol=1e-5, rtol=0)
    card = (tmp_path / "pipe" / "README.md").read_text()
    assert 'StableDiffusionPipeline.from_pretrained("' in card and "trust_remote_code" not in card
    assert "pipeline_tag: text-to-image" in card and "a photo of a {class}" in card
    assert json.loads((tmp_path / "pipe" / "ldm_vae.json").read_text())["class_names"][3] == "Dress"


def test_captions_are_dropped_to_the_empty_prompt_and_templates_drawn_per_image(tiny_ldm_cfg, tmp_path,
                                                                                 monkeypatch):
    """Each image's tokens are one of its class's templates (all of them in use), or "" (the
    pipeline's unconditional prompt) at the configured rate; the text encoder learns."""
    from .conftest import text_steps

    seen = text_steps(monkeypatch)
    run = train_ldm(tiny_ldm_cfg(*TEXT, "train.batch_size=64", "train.max_steps=3", "train.image_every=100",
                                 "train.checkpoint_every=100", "diffusion.label_dropout=0.3"), tmp_path / "run")
    from ldm_vae.data.sources import FASHION_MNIST_CLASSES
    from ldm_vae.diffusion.text import template_captions, tokenize

    tokenizer = seen[0]["tokenizer"]
    captions = template_captions(FASHION_MNIST_CLASSES)
    # each caption's tokens -> (class, template), computed here from the tokenizer the run built
    which = {tuple(ids.tolist()): (c, k) for c, per in enumerate(captions)
             for k, ids in enumerate(tokenize(tokenizer, per))}
    empty = tuple(tokenize(tokenizer, [""])[0].tolist())
    rows = [tuple(ids.tolist()) for s in seen for ids in s["tokens"]]
    labels = torch.cat([s["batch"]["label"] for s in seen]).tolist()
    dropped = [r == empty for r in rows]
    assert all(which[r][0] == c for r, c, drop in zip(rows, labels, dropped) if not drop)  # its own class's
    assert {which[r][1] for r, drop in zip(rows, dropped) if not drop} == set(range(len(CAPTION_TEMPLATES)))
    n, k = len(rows), sum(dropped)
    assert abs(k - 0.3 * n) <= 4.5 * (n * 0.3 * 0.7) ** 0.5, (k, n)
    # the text encoder learns with the UNet: its embedding of the caption tokens moved
    start, end = seen[0]["weights"], run.unet.text_encoder.state_dict()
    assert not torch.equal(start["embeddings.token_embedding.weight"],
                           end["embeddings.token_embedding.weight"])


def test_a_frozen_pretrained_text_encoder_stays_as_loaded(text_run, tiny_ldm_cfg, tmp_path):
    """text.pretrained + text.freeze: the encoder (here the text run's own checkpoint, which
    has a Stable Diffusion repo's tokenizer/ and text_encoder/ folders) keeps its weights
    and only the UNet learns."""
    from transformers import CLIPTextModel

    from ldm_vae.run.checkpoint import find_checkpoint

    source = find_checkpoint(text_run[0], "latest")
    before = CLIPTextModel.from_pretrained(source / "text_encoder").state_dict()
    run = train_ldm(tiny_ldm_cfg(*TEXT, f"text.pretrained={source}", "text.freeze=true", "train.max_steps=2",
                                 "train.image_every=100", "train.checkpoint_every=2"), tmp_path / "run")
    after = CLIPTextModel.from_pretrained(find_checkpoint(tmp_path / "run", "latest") / "text_encoder").state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in run.unet.text_encoder.parameters())
    assert all(p.requires_grad for p in run.unet.unet.parameters())  # the UNet learns (the optimizer's only)
    with pytest.raises(UserError, match="cannot load text.pretrained="):
        train_ldm(tiny_ldm_cfg(*TEXT, f"text.pretrained={tmp_path}", "train.max_steps=1"), tmp_path / "run2")


def test_sampling_a_text_model_needs_prompts_or_template_classes(text_run, tmp_path, capsys):
    from ldm_vae.cli import main

    assert main(["sample", str(text_run[0]), "--prompt", "a photo of a dress", "--prompt", "a bag", "--num-images",
                 "3", "--steps", "2", "--out", str(tmp_path / "png")]) == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["grid.png", *[f"sample_0000{i}.png" for i in range(3)]]
    assert main(["sample", str(text_run[0]), "--prompt", "a", "--class-label", "1", "--out", str(tmp_path / "x")]) == 2
    assert "pass --prompt or --class-label, not both" in capsys.readouterr().err
    pipe = load_pipeline(text_run[0])
    assert sample_conditions(pipe, None, ["a", "b"], 3) == ["a", "b", "a"]
    with pytest.raises(UserError, match="not both"):
        sample_conditions(pipe, [1], ["a"], 3)
    pipe.class_names = None  # as if trained on the dataset's own captions
    with pytest.raises(UserError, match="trained on captions: pass --prompt"):
        sample_conditions(pipe, None, None, 3)
