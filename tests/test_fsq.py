"""FSQ and LFQ tokenizers (autoencoder/fsq.py): the grid quantizer's rounding is the nearest
code, stock VQModel picks the same index, the entropy loss, config rules; then on the tiny
config, training -> export -> stock VQModel -> Tokenizer, resume parity and two processes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import VQModel

from ldm_vae import Tokenizer
from ldm_vae.autoencoder import fsq
from ldm_vae.autoencoder.config import Config, QuantizerConfig
from ldm_vae.autoencoder.fsq import ScalarQuantizer, level_entropy
from ldm_vae.autoencoder.models import (
    build_autoencoder,
    build_training_model,
    reconstruct,
)
from ldm_vae.autoencoder.quantize import entropy_penalty
from ldm_vae.autoencoder.train import train
from ldm_vae.config import load_config
from ldm_vae.data.sources import build_dataset
from ldm_vae.errors import UserError

from .conftest import TINY_FSQ, TwoProcessJob
from .test_resume import _logged, _state

LFQ = ["model.kind=lfq", "model.fsq_levels=null", "model.lfq_bits=5", "quantizer.entropy_weight=0.1"]


def _grid_quantizer(levels, **overrides) -> ScalarQuantizer:
    return ScalarQuantizer(levels, QuantizerConfig(**overrides))


def _nearest_by_search(z: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """argmin over every code in float64 (first index on a tie)."""
    return torch.cdist(z.double(), grid.double()).argmin(1)


def test_rounding_picks_the_nearest_grid_point_for_any_input_and_ties_the_lower_index():
    q = _grid_quantizer([8, 5, 3, 2])
    grid = q.grid()
    assert grid.shape == (8 * 5 * 3 * 2, 4) and grid.min() == -1 and grid.max() == 1
    torch.manual_seed(0)
    z = torch.randn(4096, 4) * 1.5  # a third of the values outside [-1, 1]: the clamp's side
    out = q(z.T.reshape(1, 4, 64, 64))
    assert torch.equal(out.indices.flatten(), _nearest_by_search(z, grid))
    # row i of the grid is the code numbered i, and each code quantizes to itself
    codes = q(grid.T.reshape(1, 4, 1, -1))
    assert torch.equal(codes.indices.flatten(), torch.arange(len(grid)))
    assert torch.equal(codes.quantized.reshape(4, -1).T, grid)
    # exact midpoints (representable for 5, 3 and 2 levels) go to the lower level, as argmin does
    q = _grid_quantizer([5, 3, 2])
    mids = torch.tensor([[-0.75, -0.5, 0.0], [0.25, 0.5, 0.0], [0.75, 0.0, 0.0]])
    assert torch.equal(q(mids.T.reshape(1, 3, 1, 3)).indices.flatten(), _nearest_by_search(mids, q.grid()))


def test_lfq_codes_are_the_signs_in_binary_order():
    q = _grid_quantizer([2] * 6)
    z = torch.randn(500, 6)
    out = q(z.T.reshape(1, 6, 1, 500))
    bits = (z > 0).long()
    assert torch.equal(out.indices.flatten(), (bits * 2 ** torch.arange(6)).sum(1))
    assert torch.equal(out.quantized.reshape(6, -1).T, bits * 2.0 - 1)


@pytest.mark.parametrize("overrides", [[], LFQ], ids=["fsq", "lfq"])
def test_stock_vqmodel_picks_the_same_code_as_the_grid_quantizer(fake_fashion, overrides):
    """The export's guarantee at the level of the quantizer: stock VQModel's own lookup
    (cdist + argmin over the materialised grid) gives our index, for latents inside and
    outside the grid's range."""
    cfg = load_config(TINY_FSQ, [f"data.path={fake_fashion}", *overrides], Config)
    ae = build_training_model(cfg)
    assert torch.equal(ae.codebook, ae.quantizer.grid()) and not ae.codebook.requires_grad
    d = ae.codebook.shape[1]
    torch.manual_seed(0)
    for scale in (0.3, 1.0, 3.0):
        h = torch.randn(8, d, 6, 6) * scale
        ours = ae.quantizer(h)
        with torch.no_grad():
            z_q, _, (_, _, theirs) = ae.vae.quantize(h)
        assert torch.equal(ours.indices.flatten(), theirs.flatten()), scale
        torch.testing.assert_close(ours.quantized, z_q, atol=1e-6, rtol=0)


def test_gradients_pass_straight_through_and_the_commitment_pulls_towards_the_grid():
    q = _grid_quantizer([5, 5], beta=0.25)
    h = (torch.randn(2, 2, 4, 4) * 2).requires_grad_()
    out = q(h)
    out.quantized.sum().backward()
    assert torch.equal(h.grad, torch.ones_like(h))  # straight-through: identity
    h.grad = None
    q(h).loss.backward()
    z = h.detach()
    expected = 2 * 0.25 * (z - out.quantized.detach()) / z.numel()  # d/dz of beta * mean((z - q)^2)
    torch.testing.assert_close(h.grad, expected)
    assert set(out.logs) == {"vq_commitment"}


@pytest.mark.parametrize("levels", [[4, 3, 3], [2] * 14, [8, 8, 8, 8, 4], [5]])
def test_entropy_loss_equals_the_loss_over_the_materialised_grid(levels):
    """Exact, per token and over the batch, for every code of the grid: the same value and
    gradient as MAGVIT-v2's loss computed over the materialised codebook
    (quantize.entropy_penalty), for halves of one and of several dimensions."""
    q = _grid_quantizer(levels)
    values = [q.table[d, :n] for d, n in enumerate(q.levels)]
    torch.manual_seed(0)
    z = (torch.randn(300, len(levels)) * 0.7).requires_grad_()
    zz = z.detach().clone().requires_grad_()
    ours = level_entropy(z, values, 0.1)
    exact = entropy_penalty(zz, q.grid(), 0.1)
    torch.testing.assert_close(ours, exact, atol=1e-5, rtol=1e-5)
    ours.backward()
    exact.backward()
    assert z.grad.abs().sum() > 0
    torch.testing.assert_close(z.grad, zz.grad, atol=1e-6, rtol=1e-4)


def test_the_batch_entropy_sees_dimensions_that_copy_each_other():
    """The joint batch entropy, not a sum over dimensions or groups: a last dimension that
    copies the first leaves half the codes of [2]*4 unused, and the loss says so by log 2."""
    values = [fsq.level_values(2)] * 4
    torch.manual_seed(0)
    z = torch.randn(4096, 4).sign() * 3  # confident codes, per-token entropy ~0
    free = level_entropy(z, values, 0.1)
    z[:, 3] = z[:, 0]
    tied = level_entropy(z, values, 0.1)
    assert fsq.split_dimensions([2] * 4) == 2  # dims 0 and 3 sit in different halves
    torch.testing.assert_close(tied - free, torch.tensor(2.0).log(), atol=0.01, rtol=0)


def test_config_rules_for_grid_quantizers(fake_fashion):
    def cfg(*overrides):
        return load_config(TINY_FSQ, [f"data.path={fake_fashion}", *overrides], Config)

    assert cfg().model.codebook_shape == (36, 3)
    assert cfg(*LFQ).model.codebook_shape == (32, 5)
    cases = {"model.fsq_levels=null": "model.fsq_levels.*is needed",
             "model.fsq_levels=[4,1]": "at least 2 levels",
             "model.fsq_levels=[64,64,64,2]": "at most 262144",
             "quantizer.l2_normalize=false": "quantizer.l2_normalize.*does not apply to model.kind 'fsq'",
             "model.num_vq_embeddings=64": "does not apply",
             "model.lfq_bits=4": "model.lfq_bits.*does not apply"}
    for override, message in cases.items():
        with pytest.raises(UserError, match=message):
            cfg(override)
    with pytest.raises(UserError, match="quantizer.beta.*does not apply to model.kind 'kl'"):
        cfg("model.kind=kl", "model.fsq_levels=null", "quantizer.beta=0.5")


@pytest.fixture(scope="module", params=["fsq", "lfq"])
def grid_run(request, tmp_path_factory, fake_fashion):
    """A 40-step run of each kind (GAN from step 20, checkpoints at 20 and 40)."""
    overrides = [f"data.path={fake_fashion}", "train.max_steps=40", "train.checkpoint_every=20"]
    cfg = load_config(TINY_FSQ, overrides + (LFQ if request.param == "lfq" else []), Config)
    out = tmp_path_factory.mktemp("run") / request.param
    return cfg, out, train(cfg, out)


def test_grid_tokenizer_trains_exports_to_stock_vqmodel_with_index_parity(grid_run):
    cfg, out, run = grid_run
    x = torch.stack([build_dataset(cfg.data, "test", train=False)[i]["pixel_values"] for i in range(32)])
    torch.manual_seed(cfg.seed)
    initial = build_autoencoder(cfg.model, cfg.data.resolution)
    stock = VQModel.from_pretrained(out / "export")
    with torch.no_grad():
        before = (reconstruct(initial, x) - x).abs().mean()
        after = (reconstruct(stock, x) - x).abs().mean()
    assert after < 0.7 * before, (before, after)
    logs = run.summary["final_logs"]
    assert {"usage", "perplexity", "vq_commitment"} <= set(logs)
    assert ("vq_entropy" in logs) == (cfg.model.kind == "lfq")
    # the grid never moved, and the trainer's model (EMA weights) is what stock diffusers loads
    assert torch.equal(stock.quantize.embedding.weight, run.autoencoder.quantizer.grid())
    ae = run.autoencoder
    run.ema.copy_to([p for n, p in ae.vae.named_parameters() if not n.startswith("quantize.")])
    ae.eval()
    with torch.no_grad():
        assert torch.equal(reconstruct(ae.vae, x), stock.decode(stock.encode(x).latents).sample)
        # index parity on real encoder outputs: our rounding vs stock VQModel's lookup, every token
        h = stock.encode(x).latents
        ours = ae.quantizer(h).indices
        quant, _, (_, _, theirs) = stock.quantize(h)
        from_codes = stock.decode(quant, force_not_quantize=True).sample
    assert torch.equal(ours.flatten(), theirs.flatten())
    # the Tokenizer works from the stock export alone
    tok = Tokenizer.from_pretrained(out / "export")
    ids = tok.encode(x)
    assert torch.equal(ids, ours) and tok.codebook_size == cfg.model.codebook_shape[0]
    torch.testing.assert_close(tok.decode(ids), from_codes, atol=1e-5, rtol=1e-5)
    card = (out / "export" / "README.md").read_text()
    kind = cfg.model.kind
    rule = "per-dimension rounding" if kind == "fsq" else "the sign of each dimension"
    for fact in (f"{kind.upper()} tokenizer f2", f"tags:\n- ldm-vae\n- autoencoder\n- {kind}", rule):
        assert fact in card, fact
    info = json.loads((out / "export" / "ldm_vae.json").read_text())
    assert 0 < info["latent_stats"]["codebook_usage"] <= 1


@pytest.mark.parametrize("grid_run", ["fsq"], indirect=True)  # lfq differs only by a stateless loss term
def test_resumed_grid_run_ends_bit_identical(grid_run, tmp_path):
    """Resume from the step-20 checkpoint of a copy of the run: the same step-40 state (weights,
    optimizers, EMA, the quantizer's usage buffers) and the same logged losses."""
    cfg, out, _ = grid_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoint-40", "export", "summary.json"))
    train(cfg, copy, resume="latest")
    reference, resumed = _state(out / "checkpoint-40"), _state(copy / "checkpoint-40")
    assert any("last_hit" in k for k in reference)
    assert reference.keys() == resumed.keys()
    for k in reference:
        assert torch.equal(reference[k], resumed[k]), k
    assert _logged(out) == _logged(copy)


LFQ_TWO_PROCESSES = TwoProcessJob("lfq", TINY_FSQ, ("data.path={fake_fashion}", *LFQ, "train.max_steps=10",
                                                   "loss.disc_start=5", "train.checkpoint_every=10"))


@pytest.mark.parametrize("two_process_run", [LFQ_TWO_PROCESSES], indirect=True, ids=["lfq"])
def test_two_process_lfq_training_keeps_ranks_identical(two_process_run):
    """Usage counts are summed over processes, so the quantizer's buffers agree; the weights
    are DDP's (with the entropy term's gradients)."""
    ranks = two_process_run.ranks
    assert ranks[0]["ae.quantizer.last_hit"].max() == 9  # codes were counted up to the last step (from 0)
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), k
