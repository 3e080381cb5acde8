"""VQ tokenizer end to end on the tiny CPU config (synthetic data, RANDOM LPIPS backbone).

Covers: training lowers the reconstruction error and keeps the codebook in use; the export
loads in stock diffusers `VQModel` and reproduces the trainer's model exactly; `Tokenizer`
ids are stock VQModel's codes and decode like stock decode; resume refuses another codebook
update rule (resume parity: tests/test_resume.py); two processes end with the same codebook.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import VQModel

from ldm_vae import Tokenizer
from ldm_vae.autoencoder.models import build_autoencoder, reconstruct
from ldm_vae.autoencoder.train import train
from ldm_vae.data.sources import build_dataset
from ldm_vae.errors import UserError

from .conftest import TINY_VQ, TwoProcessJob


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory, fake_fashion):
    """One 60-step run shared by the tests below (GAN from step 40, restarts on)."""
    from ldm_vae.autoencoder.config import Config
    from ldm_vae.config import load_config

    from .conftest import TINY_VQ

    cfg = load_config(TINY_VQ, [f"data.path={fake_fashion}", "train.max_steps=60", "loss.disc_start=40",
                                "train.checkpoint_every=30"], Config)
    out = tmp_path_factory.mktemp("run") / "vq"
    return cfg, out, train(cfg, out)


def _test_images(cfg, n=32):
    return torch.stack([build_dataset(cfg.data, "test", train=False)[i]["pixel_values"] for i in range(n)])


def test_vq_run_learns_and_uses_its_codebook(vq_run):
    cfg, out, run = vq_run
    summary = run.summary
    x = _test_images(cfg)
    torch.manual_seed(cfg.seed)
    initial = build_autoencoder(cfg.model, cfg.data.resolution)
    stock = VQModel.from_pretrained(out / "export")
    before = (reconstruct(initial, x) - x).abs().mean()
    after = (reconstruct(stock, x) - x).abs().mean()
    assert after < 0.6 * before, (before, after)
    logs = summary["final_logs"]
    assert {"usage", "perplexity", "vq_commitment", "vq_codebook", "g_adv"} <= set(logs)
    assert logs["usage"] > 0.9 and logs["perplexity"] > 10
    # the cosine codebook is stored unit-norm, as stock VQModel's Euclidean lookup needs
    torch.testing.assert_close(stock.quantize.embedding.weight.norm(dim=1), torch.ones(64))
    assert (out / "codebook_usage.png").is_file()
    info = json.loads((out / "export" / "ldm_vae.json").read_text())
    assert 0 < info["latent_stats"]["codebook_usage"] <= 1


def test_export_loads_in_stock_vqmodel_and_reproduces_the_trained_model(vq_run):
    cfg, out, run = vq_run
    ae, ema = copy.deepcopy(run.autoencoder), run.ema
    from ldm_vae.autoencoder.models import ema_parameters

    ema.copy_to(ema_parameters(ae.vae))  # the trainer's EMA weights and its live codebook
    ae.eval()
    stock = VQModel.from_pretrained(out / "export")
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ours, theirs = reconstruct(ae.vae, x), stock.decode(stock.encode(x).latents).sample
    assert torch.equal(ours, theirs)
    assert stock.config.scaling_factor != pytest.approx(0.18215) and stock.config.scaling_factor > 0
    data = torch.stack([build_dataset(cfg.data, "train", train=False)[i]["pixel_values"] for i in range(128)])
    with torch.no_grad():
        h = stock.encode(data).latents
    # issue 15: 1/RMS, since nothing subtracts the mean: the latents a diffusion model trains on
    # have second moment 1, not 1 + (mean/std)^2
    assert abs((h * stock.config.scaling_factor).pow(2).mean().sqrt().item() - 1) < 0.1
    card = (out / "export" / "README.md").read_text()
    for fact in ("library_name: diffusers", "64 codes of dimension 4", "| Downsampling factor | 2 ",
                 "| Tokens per image | 64 at 16 x 16", "RANDOM LPIPS backbone"):
        assert fact in card, fact


def test_tokenizer_ids_are_stock_codes_and_decode_like_stock(vq_run):
    cfg, out, _ = vq_run
    tok = Tokenizer.from_pretrained(out / "export")
    x = _test_images(cfg, 8)
    ids = tok.encode(x)
    assert ids.shape == (8, 8, 8) and ids.dtype == torch.int64 and tok.codebook_size == 64
    stock = VQModel.from_pretrained(out / "export")
    with torch.no_grad():
        h = stock.encode(x).latents
        quant, _, (_, _, stock_ids) = stock.quantize(h)
        stock_recon = stock.decode(h).sample
        # decode(indices) == decode(quantized latents)
        from_codes = stock.decode(quant, force_not_quantize=True).sample
    assert torch.equal(ids.flatten(), stock_ids.flatten())
    recon = tok.decode(ids)
    torch.testing.assert_close(recon, from_codes, atol=1e-5, rtol=1e-5)
    # stock decode adds (code - h) back onto h, a float rounding away from the code itself
    torch.testing.assert_close(recon, stock_recon, atol=1e-4, rtol=1e-4)
    with pytest.raises(UserError, match="token ids must be in"):
        tok.decode(torch.full((1, 8, 8), 64))
    with pytest.raises(UserError, match="multiples of the downsampling factor"):
        tok.encode(torch.zeros(1, 3, 9, 9))


def test_vq_resume_refuses_another_codebook_update_rule(tmp_path, tiny_vq_cfg):
    """Switching the codebook's update rule mid-run is refused, not half-loaded. (That a
    resumed VQ run ends bit-identical, quantizer state included, and continues from its
    checkpoint: tests/test_resume.py, killed with SIGKILL, one process and two.)"""
    overrides = ("train.max_steps=2", "train.checkpoint_every=2", "loss.disc_start=100")
    train(tiny_vq_cfg(*overrides), tmp_path / "part")
    with pytest.raises(UserError, match="quantizer.ema_decay differ"):
        train(tiny_vq_cfg(*overrides, "train.max_steps=4", "quantizer.ema_decay=0.9"), tmp_path / "part",
              resume="latest")


# more codes than a few batches can hit, so dead codes are restarted
VQ_TWO_PROCESSES = TwoProcessJob("vq", TINY_VQ, (
    "data.path={fake_fashion}", "train.max_steps=20", "loss.disc_start=10", "model.num_vq_embeddings=1024",
    "quantizer.restart_after_steps=2", "quantizer.entropy_weight=0.01", "quantizer.ema_decay=0.9"))


@pytest.mark.parametrize("two_process_run", [VQ_TWO_PROCESSES], indirect=True, ids=["vq"])
def test_two_process_vq_training_keeps_the_codebook_identical(two_process_run):
    """k-means, usage counts, restarts and the EMA codebook statistics (all-reduced by us)
    under 2-process DDP. (The gradient-mode codebook is a parameter that DDP keeps in step;
    its two-process run is resumed and compared bit for bit in tests/test_resume.py.)"""
    ranks = two_process_run.ranks
    assert ranks[0]["ae.quantizer.last_restart"].max() > 0  # restarts happened
    assert ranks[0]["ae.quantizer.initialized"].item()
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k


def test_codebook_and_lecam_state_move_once_per_optimizer_step(tiny_vq_cfg, tmp_path, monkeypatch):
    """With gradient accumulation, the EMA codebook, dead-code restarts and the LeCam averages
    take one step per optimizer step (from every micro-batch's statistics), not one per
    micro-batch."""
    from ldm_vae.autoencoder.losses import LeCamEMA
    from ldm_vae.autoencoder.quantize import VectorQuantizer

    calls = {"observe": 0, "update": 0, "lecam": 0}
    for cls, name, key in ((VectorQuantizer, "observe", "observe"), (VectorQuantizer, "update", "update"),
                           (LeCamEMA, "update", "lecam")):
        original = getattr(cls, name)

        def counted(self, *args, _original=original, _key=key, **kwargs):
            calls[_key] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, counted)
    run = train(tiny_vq_cfg("train.max_steps=3", "train.grad_accum_steps=2", "loss.disc_start=0",
                            "loss.lecam_weight=0.1", "quantizer.ema_decay=0.9", "train.log_every=1"), tmp_path / "run")
    assert run.summary["steps"] == 3
    assert calls == {"observe": 6, "update": 3, "lecam": 3}


def test_a_nan_step_in_training_leaves_the_quantizer_state_bit_identical(tiny_vq_cfg, tmp_path, monkeypatch):
    """A step skipped for a non-finite loss (finite encoder outputs, so every token is observed)
    changes no quantizer buffer and no code: no usage count, EMA statistic or restart."""
    from ldm_vae.autoencoder.quantize import VectorQuantizer

    from .test_reliability import _inject_nan

    nan_steps = {3, 4}
    _inject_nan(monkeypatch, nan_steps)
    seen = {}
    original = VectorQuantizer.update

    def update(self, codebook, step, stepped):
        before = {k: v.clone() for k, v in self.state_dict().items()}, codebook.clone()
        result = original(self, codebook, step, stepped)
        after = self.state_dict(), codebook
        seen[step] = (all(torch.equal(after[0][k], before[0][k]) for k in before[0])
                      and torch.equal(after[1], before[1]))
        return result

    monkeypatch.setattr(VectorQuantizer, "update", update)
    run = train(tiny_vq_cfg("train.max_steps=6", "quantizer.ema_decay=0.9", "quantizer.restart_after_steps=1",
                            "loss.disc_start=100"), tmp_path / "run")
    assert run.summary["skipped_steps"] == len(nan_steps)
    assert {s for s, unchanged in seen.items() if unchanged} == nan_steps  # and every finite step moved it
