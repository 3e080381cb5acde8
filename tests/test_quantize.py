"""The training-time quantizer: lookup equal to stock VQModel's, losses, k-means, restarts, EMA, entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_vae.autoencoder import quantize
from ldm_vae.autoencoder.config import QuantizerConfig
from ldm_vae.autoencoder.models import build_training_model
from ldm_vae.autoencoder.quantize import (
    VectorQuantizer,
    entropy_penalty,
    kmeans,
    nearest_code,
)

STEPPED = torch.tensor(True)  # `update`'s flag: the optimizer step happened


def _quantizer(k=32, d=4, **overrides):
    cfg = QuantizerConfig(kmeans_init=False, **overrides)
    codebook = torch.nn.Parameter(torch.randn(k, d))
    q = VectorQuantizer(k, d, cfg)
    q.prepare_codebook(codebook)
    return q, codebook


@pytest.mark.parametrize("l2", [True, False])
def test_indices_equal_stock_vqmodel_lookup(tiny_vq_cfg, l2):
    """Our training-time choice of code is the one stock `VQModel.decode` makes at inference."""
    cfg = tiny_vq_cfg(f"quantizer.l2_normalize={str(l2).lower()}", "model.num_vq_embeddings=512")
    torch.manual_seed(0)
    ae = build_training_model(cfg)
    with torch.no_grad():  # spread codes (diffusers initialises them all within 1/512 of 0)
        ae.codebook.normal_()
    ae.quantizer.prepare_codebook(ae.codebook)
    stock = ae.vae.quantize  # diffusers' VectorQuantizer, as VQModel.decode uses it
    if l2:  # the stored codebook is unit-norm, as the trainer keeps it
        torch.testing.assert_close(ae.codebook.norm(dim=1), torch.ones(512))
    for scale in (0.1, 1.0, 30.0):  # the lookup input is not normalised in stock diffusers
        h = torch.randn(8, 4, 6, 6) * scale
        ours = ae.quantizer(h, ae.codebook)
        with torch.no_grad():
            z_q, _, (_, _, theirs) = stock(h)
        ours_idx, theirs_idx = ours.indices.flatten(), theirs.flatten()
        # identical, except where two codes are equally near within float32 rounding (a
        # different summation order may then pick the other one): check in float64
        differ = (ours_idx != theirs_idx).nonzero().flatten()
        assert len(differ) <= 0.01 * len(ours_idx), len(differ)
        z = h.permute(0, 2, 3, 1).reshape(-1, 4).double()
        d = torch.cdist(z, ae.codebook.detach().double())
        for i in differ:
            assert abs(d[i, ours_idx[i]] - d[i, theirs_idx[i]]) < 1e-6 * d[i, theirs_idx[i]]
        # and what the decoder receives is the code stock diffusers picks
        same = ours_idx == theirs_idx
        q_ours, q_theirs = (t.permute(0, 2, 3, 1).reshape(-1, 4)[same] for t in (ours.quantized, z_q))
        torch.testing.assert_close(q_ours, q_theirs, atol=1e-5 * scale, rtol=1e-5)


def test_chunked_lookup_equals_full_cdist(monkeypatch):
    monkeypatch.setattr(quantize, "CHUNK_PAIRS", 100)  # forces ~50 chunks of 3 rows
    z, codebook = torch.randn(157, 8), torch.randn(37, 8)
    assert torch.equal(nearest_code(z, codebook), torch.cdist(z, codebook).argmin(1))


def test_losses_put_beta_on_the_commitment_term_and_pass_gradients_straight_through():
    beta = 0.25
    q, codebook = _quantizer(l2_normalize=False, beta=beta, restart_after_steps=0)
    h = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(h, codebook)
    e = codebook.detach()[out.indices.flatten()]
    z = h.detach().permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(out.quantized.permute(0, 2, 3, 1).reshape(-1, 4), e)  # forward: the codes
    out.loss.backward(retain_graph=True)
    n = z.numel()
    grad_z = h.grad.permute(0, 2, 3, 1).reshape(-1, 4)
    torch.testing.assert_close(grad_z, beta * 2 * (z - e) / n)  # commitment: beta, to the encoder only
    expected_codebook = torch.zeros_like(codebook).index_add_(0, out.indices.flatten(), 2 * (e - z) / n)
    torch.testing.assert_close(codebook.grad, expected_codebook)  # codebook term: weight 1, to the codes only
    # straight-through: d(quantized)/dh is the identity
    h.grad = None
    w = torch.randn_like(out.quantized)
    (out.quantized * w).sum().backward()
    torch.testing.assert_close(h.grad, w)


def test_quantization_maths_is_fp32_under_bf16_autocast():
    q, codebook = _quantizer()
    h = torch.randn(4, 4, 5, 5)
    ref = q(h, codebook)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(h, codebook)
    assert out.loss.dtype == torch.float32 and out.quantized.dtype == torch.float32
    assert torch.equal(out.indices, ref.indices)


def test_kmeans_finds_separated_clusters():
    centres = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [-5.0, 0, 0]])
    g = torch.Generator().manual_seed(0)
    x = (centres.repeat_interleave(50, 0) + 0.1 * torch.randn(200, 3, generator=g))
    found = kmeans(x, 4, iters=10, spherical=False, generator=torch.Generator().manual_seed(1))
    # every true centre has a found centre next to it
    assert torch.cdist(centres, found).min(1).values.max() < 0.2


def test_kmeans_init_sets_a_unit_norm_codebook_from_encoder_outputs():
    cfg = QuantizerConfig(kmeans_init=True, kmeans_iters=5)
    codebook = torch.nn.Parameter(torch.randn(16, 4))
    q = VectorQuantizer(16, 4, cfg)
    q.prepare_codebook(codebook)
    assert not q.initialized
    z = torch.randn(400, 4) * 3 + 1
    q.kmeans_init(z, codebook.data)
    assert q.initialized
    torch.testing.assert_close(codebook.norm(dim=1), torch.ones(16))
    # spherical k-means of the normalised outputs, seeded by the run's seed
    zn = F.normalize(z, dim=1)
    expected = kmeans(zn, 16, 5, spherical=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(codebook.detach(), expected)
    # which fits the outputs better than the random unit codebook it replaced
    random_codes = F.normalize(torch.randn(16, 4, generator=torch.Generator().manual_seed(3)), dim=1)
    fit = (zn @ codebook.detach().T).max(1).values.mean()
    assert fit > (zn @ random_codes.T).max(1).values.mean()


def test_dead_codes_are_restarted_from_encoder_outputs_after_the_patience():
    q, codebook = _quantizer(k=8, d=4, l2_normalize=False, restart_after_steps=10)
    # every token sits next to code 0, so codes 1..7 are never picked
    with torch.no_grad():
        codebook[0] = 0.0
        codebook[1:] = 100.0
    h = torch.randn(1, 4, 4, 4) * 0.01
    out = q(h, codebook)
    q.observe(out)
    logs, restarted = q.update(codebook.data, step=10, stepped=STEPPED)
    assert logs["restarted"] == 0 and restarted.numel() == 0  # not idle for > 10 steps yet
    assert q.usage(10) == pytest.approx(1 / 8)
    q.observe(out)
    logs, restarted = q.update(codebook.data, step=11, stepped=STEPPED)
    assert logs["restarted"] == 7 and sorted(restarted.tolist()) == list(range(1, 8))
    rows = {tuple(r) for r in out.z.tolist()}
    assert all(tuple(codebook[k].tolist()) in rows for k in range(1, 8))  # re-seeded from actual outputs
    assert q.last_restart[1:].eq(11).all() and q.last_restart[0] == 0
    q.observe(q(h, codebook))
    assert q.update(codebook.data, step=12, stepped=STEPPED)[0]["restarted"] == 0  # grace period after a restart


@pytest.mark.parametrize("l2", [True, False])
def test_a_skipped_step_leaves_every_quantizer_buffer_and_the_codebook_unchanged(l2):
    """README: a skipped step gets no quantizer update. With hits, EMA statistics and codes
    due for a restart, `update(stepped=False)` changes nothing; the same call with True does."""
    q, codebook = _quantizer(k=16, d=4, l2_normalize=l2, restart_after_steps=1, ema_decay=0.9)
    h = torch.randn(1, 4, 2, 2)  # 4 tokens: at least 12 codes unused
    q.observe(q(h, codebook))
    q.update(codebook.data, step=0, stepped=STEPPED)
    before = {k: v.clone() for k, v in q.state_dict().items()}, codebook.detach().clone()
    q.observe(q(h * 3, codebook))
    logs, restarted = q.update(codebook.data, step=5, stepped=torch.tensor(False))  # unused codes are due
    assert restarted.numel() == 0 and logs["restarted"] == 0
    for k, v in q.state_dict().items():
        assert torch.equal(v, before[0][k]), k
    assert torch.equal(codebook.detach(), before[1])
    # the control: the same statistics with a real step move the state and restart codes
    q.observe(q(h * 3, codebook))
    logs, restarted = q.update(codebook.data, step=5, stepped=STEPPED)
    assert restarted.numel() > 0 and not torch.equal(codebook.detach(), before[1])
    assert not torch.equal(q.hist, before[0]["hist"]) and not torch.equal(q.ema_sum, before[0]["ema_sum"])


def test_restarted_codes_lose_their_adamw_moments():
    """A re-seeded code must not keep the moments of the code it replaced: they would push it
    away from the encoder output it was just set to."""
    from ldm_vae.autoencoder.train import reset_adam_rows

    codebook = torch.nn.Parameter(torch.randn(6, 3))
    opt = torch.optim.AdamW([codebook], lr=0.1)
    codebook.grad = torch.randn(6, 3)
    opt.step()
    rows = torch.tensor([1, 4])
    reset_adam_rows(opt, codebook, rows)
    for key in ("exp_avg", "exp_avg_sq"):
        moments = opt.state[codebook][key]
        assert moments[rows].eq(0).all() and moments[[0, 2, 3, 5]].ne(0).all(), key
    reset_adam_rows(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))]), codebook, rows)  # no state: no-op


def test_statistics_of_accumulated_micro_batches_update_once_per_optimizer_step():
    """With gradient accumulation the EMA codebook takes one step from the summed statistics
    of every micro-batch, as one large batch would, not one step per micro-batch."""
    def run(batches):
        q, codebook = _quantizer(k=4, d=2, l2_normalize=False, ema_decay=0.5, restart_after_steps=0)
        with torch.no_grad():
            codebook.copy_(torch.tensor([[1.0, 0], [-1.0, 0], [0, 1.0], [0, -1.0]]))
            q.ema_sum.copy_(codebook)
        for h in batches:
            q.observe(q(h, codebook))
        q.update(codebook.data, step=0, stepped=STEPPED)
        return codebook.detach().clone(), q.ema_count.clone(), q.hist.clone()

    h = torch.tensor([[1.5, 0.1], [1.3, -0.1], [0.1, 0.9], [-1.2, 0.0]]).T.reshape(1, 2, 2, 2)
    whole = run([h])
    halves = run([h[:, :, :1], h[:, :, 1:]])
    for a, b in zip(whole, halves):
        torch.testing.assert_close(a, b)


def test_ema_codebook_moves_to_the_mean_of_its_assignments_without_gradients():
    q, codebook = _quantizer(k=4, d=2, l2_normalize=False, ema_decay=0.5, restart_after_steps=0)
    assert not codebook.requires_grad
    with torch.no_grad():
        codebook.copy_(torch.tensor([[1.0, 0], [-1.0, 0], [0, 1.0], [0, -1.0]]))
        q.ema_sum.copy_(codebook)
    h = torch.tensor([[1.5, 0.1], [1.3, -0.1]]).T.reshape(1, 2, 1, 2)  # two tokens next to code 0
    out = q(h, codebook)
    assert "vq_codebook" not in out.logs  # no codebook loss: the EMA moves the codes
    before = codebook.detach().clone()
    q.observe(out)
    q.update(codebook.data, step=0, stepped=STEPPED)
    # code 0 = EMA of the sums of its tokens / EMA of their count (Laplace smoothing ~1e-5)
    expected = (0.5 * 1.0 + 0.5 * (1.5 + 1.3)) / (0.5 * 1 + 0.5 * 2)
    assert codebook[0, 0].item() == pytest.approx(expected, rel=1e-4) and codebook[0, 0] > before[0, 0]
    torch.testing.assert_close(codebook[1:], before[1:], atol=1e-4, rtol=1e-4)  # unassigned codes stay


def test_entropy_penalty_prefers_confident_diverse_assignments_and_has_gradients():
    codebook = torch.eye(4)
    diverse = torch.eye(4) * 3  # each token near a different code
    collapsed = torch.tensor([[3.0, 0, 0, 0]]).repeat(4, 1)
    assert entropy_penalty(diverse, codebook, 0.1) < entropy_penalty(collapsed, codebook, 0.1)
    q, cb = _quantizer(entropy_weight=0.1)
    h = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(h, cb)
    assert "vq_entropy" in out.logs
    out.loss.backward()
    assert h.grad.abs().sum() > 0


def test_renormalize_keeps_cosine_codebook_on_the_unit_sphere():
    q, codebook = _quantizer()
    with torch.no_grad():
        codebook.mul_(3.0)
    q.renormalize_(codebook.data, torch.tensor(False))  # a skipped optimizer step leaves it alone
    torch.testing.assert_close(codebook.norm(dim=1), torch.full((32,), 3.0))
    q.renormalize_(codebook.data, torch.tensor(True))
    torch.testing.assert_close(codebook.norm(dim=1), torch.ones(32))
