"""The training-time vector quantizer of `model.kind: vq`.

diffusers' `VQModel` holds the codebook (`vae.quantize.embedding.weight`) and does the
inference-time lookup; this module trains it. We do not use diffusers' `VectorQuantizer`
loss: with its default `legacy=True` the commitment weight beta lands on the codebook term.

Why not `vector-quantize-pytorch`: it keeps its own codebook tensors (and, for cosine
codebooks, an unnormalised copy), so every step would have to be mirrored into VQModel's
`nn.Embedding`; here the one codebook the optimizer trains is the one that is exported.

What makes the codebook used (the public recipes lose most of it):
- l2-normalised codes, cosine lookup (ViT-VQGAN, arXiv:2110.04627, sec. 3.2; LlamaGen,
  arXiv:2406.06525). The codebook is stored normalised; for unit-norm codes
  argmin ||h - e||^2 = argmax <h, e> = argmax <h/|h|, e>, so stock VQModel's Euclidean
  lookup on the unnormalised `encode(x).latents` picks the same codes (tested);
- a low-dimensional lookup (`vq_embed_dim`, e.g. 8) through VQModel's 1x1 convolutions;
- k-means initialisation from encoder outputs (as in vector-quantize-pytorch, SoundStream);
- dead-code restart from current encoder outputs (Jukebox, arXiv:2005.00341, sec. 2.3);
- optional EMA codebook updates (arXiv:1711.00937, app. A.1) and entropy penalty.

Every stateful operation gives the same codebook on every process: usage counts and EMA
statistics are summed over processes before use; restarts draw from encoder outputs
gathered from all processes with a generator seeded by (seed, step); k-means runs on the
main process and is broadcast. All quantization maths is fp32 with autocast off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate.state import PartialState
from accelerate.utils import broadcast, gather, reduce
from torch import nn

from .config import QuantizerConfig

# distances are computed for at most this many (token, code) pairs at a time: 16384 codes
# x 2**10 tokens = 64 MiB of fp32, whatever the batch (a full cdist could take GiBs)
CHUNK_PAIRS = 2**24


def code_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of a histogram of code hits: the effective number of codes in use."""
    p = counts.double() / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-30))).sum())


def code_stats(counts: torch.Tensor) -> dict:
    """Usage (share of codes hit at least once), codes used and perplexity of a hit histogram."""
    return {"codebook_size": counts.numel(), "codes_used": int((counts > 0).sum()),
            "codebook_usage": (counts > 0).double().mean().item(),
            "codebook_perplexity": code_perplexity(counts).item()}


@torch.no_grad()
def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||z_i - e_k||^2 for each row of z [N, D] (fp32, chunked over rows)."""
    z, codebook = z.float(), codebook.float()
    # ||z||^2 is the same for every code of a row, so only ||e||^2 - 2<z, e> is compared
    e_sq = codebook.pow(2).sum(1)
    rows = max(1, CHUNK_PAIRS // codebook.shape[0])
    return torch.cat([torch.addmm(e_sq, chunk, codebook.T, alpha=-2).argmin(1) for chunk in z.split(rows)])


def entropy_penalty(z: torch.Tensor, codebook: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean per-token entropy minus the entropy of the mean soft assignment (MAGVIT-v2, eq. 5).

    Low per-token entropy makes assignments confident; high batch entropy spreads them
    over the codebook. Memory is [tokens x codes].
    """
    logits = torch.addmm(codebook.pow(2).sum(1), z, codebook.T, alpha=-2).neg() / temperature
    probs = logits.softmax(1)
    per_token = -(probs * logits.log_softmax(1)).sum(1).mean()
    mean_probs = probs.mean(0)
    batch = -(mean_probs * torch.log(mean_probs.clamp_min(1e-12))).sum()
    return per_token - batch


def kmeans(x: torch.Tensor, k: int, iters: int, spherical: bool, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means of rows of x [N, D] into k centres (spherical: unit-norm centres)."""
    n = x.shape[0]
    pick = torch.randperm(n, generator=generator)[:k] if n >= k else torch.randint(n, (k,), generator=generator)
    centres = x[pick.to(x.device)].clone()
    for _ in range(iters):
        idx = nearest_code(x, centres)
        sums = torch.zeros_like(centres).index_add_(0, idx, x)
        counts = torch.bincount(idx, minlength=k).unsqueeze(1)
        # an empty cluster keeps its centre (a restart re-seeds it later if it stays unused)
        centres = torch.where(counts > 0, sums / counts.clamp_min(1), centres)
        if spherical:
            centres = F.normalize(centres, dim=1)
    return centres


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # [B, D, H, W], straight-through: forward = codes, backward = identity to z
    indices: torch.Tensor  # [B, H, W] long
    z: torch.Tensor  # [B*H*W, D] detached fp32 lookup inputs (normalised when l2_normalize)
    loss: torch.Tensor  # codebook_weight * codebook + beta * commitment (+ entropy term)
    logs: dict


def straight_through(z: torch.Tensor, zq: torch.Tensor, idx: torch.Tensor, shape: torch.Size, loss: torch.Tensor,
                     logs: dict) -> QuantizerOutput:
    """A quantizer's output from its [N, D] rows: the codes zq in the forward, the identity to z
    in the backward (straight-through estimator, arXiv:1711.00937, sec. 3.1), as [B, D, H, W]."""
    b, d, hh, ww = shape
    quantized = (z + (zq - z).detach()).view(b, hh, ww, d).permute(0, 3, 1, 2)
    return QuantizerOutput(quantized, idx.view(b, hh, ww), z.detach(), loss, {k: v.detach() for k, v in logs.items()})


class CodeUsage(nn.Module):
    """What every quantizer keeps about its codes (buffers that checkpoints carry): when each
    code was last picked, and the hit counts of the usage histogram since the last picture.

    Hits are counted per forward (`observe`) and summed over processes once per optimizer
    step (`count_step`), so every process holds the same buffers.
    """

    def __init__(self, num_codes: int, cfg: QuantizerConfig):
        super().__init__()
        self.cfg, self.num_codes = cfg, num_codes
        self.register_buffer("last_hit", torch.full((num_codes,), -1, dtype=torch.long))
        self.register_buffer("hist", torch.zeros(num_codes, dtype=torch.long))
        # the current optimizer step's hits (never in a checkpoint: `count_step` consumes them)
        self._pending_counts = None

    @torch.no_grad()
    def observe(self, out: QuantizerOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """After each forward (every gradient-accumulation micro-step): add its code hits to
        the optimizer step's pending counts; returns (indices, finite-row mask) of the counted rows."""
        # rows from a non-finite forward (a step the trainer skips) must not reach the state
        finite = torch.isfinite(out.z).all(1)
        idx = out.indices.reshape(-1)[finite]
        counts = torch.bincount(idx, minlength=self.num_codes)
        self._pending_counts = counts if self._pending_counts is None else self._pending_counts + counts
        return idx, finite

    @torch.no_grad()
    def count_step(self, step: int, stepped: torch.Tensor) -> torch.Tensor:
        """Once per optimizer step: the step's hits summed over processes (none where the step
        was skipped, `stepped` being a device flag), added to the histogram and `last_hit`."""
        counts = reduce(self._pending_counts, "sum") * stepped
        self.hist += counts
        self.last_hit[counts > 0] = step
        self._pending_counts = None
        return counts

    def usage(self, step: int) -> torch.Tensor:
        """Share of codes picked at least once in the last `usage_window` steps."""
        return ((self.last_hit >= 0) & (self.last_hit > step - self.cfg.usage_window)).float().mean()


class VectorQuantizer(CodeUsage):
    """Quantizes `VQModel.encode(x).latents` against VQModel's own codebook.

    The codebook is passed in (`vae.quantize.embedding.weight`) rather than owned, so the
    trained and exported codebook are one tensor. This module holds the bookkeeping buffers,
    which checkpoints carry: besides `CodeUsage`'s, when each code was last restarted and
    the EMA statistics.
    """

    def __init__(self, num_codes: int, dim: int, cfg: QuantizerConfig, seed: int = 0):
        super().__init__(num_codes, cfg)
        self.dim, self.seed = dim, seed
        self.register_buffer("initialized", torch.tensor(not cfg.kmeans_init))
        self.register_buffer("last_restart", torch.zeros(num_codes, dtype=torch.long))
        if cfg.ema_decay > 0:
            self.register_buffer("ema_count", torch.ones(num_codes))
            self.register_buffer("ema_sum", torch.zeros(num_codes, dim))
        # the step's EMA sums and restart candidates, consumed by `update` like the counts
        self._pending_sums = self._candidates = None

    def prepare_codebook(self, codebook: torch.Tensor) -> None:
        """Before training: normalise a cosine codebook; EMA mode: start the statistics from it."""
        with torch.no_grad():
            if self.cfg.l2_normalize:
                codebook.copy_(F.normalize(codebook, dim=1))
            if self.cfg.ema_decay > 0:
                self.ema_sum.copy_(codebook)
        # EMA mode moves the codebook by statistics, never by an optimizer
        codebook.requires_grad_(self.cfg.ema_decay == 0)

    def _lookup_input(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize(z, dim=1) if self.cfg.l2_normalize else z

    def forward(self, h: torch.Tensor, codebook: torch.Tensor) -> QuantizerOutput:
        d = h.shape[1]
        cfg = self.cfg
        # fp32 whatever the autocast context: bf16 distances pick wrong codes
        with torch.autocast(h.device.type, enabled=False):
            z = self._lookup_input(h.float().permute(0, 2, 3, 1).reshape(-1, d))
            e = F.normalize(codebook.float(), dim=1) if cfg.l2_normalize else codebook.float()
            idx = nearest_code(z.detach(), e.detach())
            zq = F.embedding(idx, e)
            commitment = (z - zq.detach()).pow(2).mean()
            loss = cfg.beta * commitment
            logs = {"vq_commitment": commitment}
            if codebook.requires_grad:  # gradient codebook; in EMA mode update() moves it
                codebook_term = (zq - z.detach()).pow(2).mean()
                loss = loss + cfg.codebook_weight * codebook_term
                logs["vq_codebook"] = codebook_term
            if cfg.entropy_weight > 0:
                ent = entropy_penalty(z, e, cfg.entropy_temperature)
                loss = loss + cfg.entropy_weight * ent
                logs["vq_entropy"] = ent
            return straight_through(z, zq, idx, h.shape, loss, logs)

    @torch.no_grad()
    def kmeans_init(self, z: torch.Tensor, codebook: torch.Tensor) -> None:
        """Set the codebook to k-means centres of encoder outputs z [N, D] from every process."""
        z = self._lookup_input(z.float())
        z_all = gather(z.contiguous())
        state = PartialState()
        if state.is_main_process:
            centres = kmeans(z_all, self.num_codes, self.cfg.kmeans_iters, self.cfg.l2_normalize,
                             torch.Generator().manual_seed(self.seed))
        else:
            centres = torch.empty_like(codebook, dtype=torch.float32)
        centres = broadcast(centres.contiguous(), from_process=0)
        codebook.copy_(centres)
        if self.cfg.ema_decay > 0:
            self.ema_count.fill_(1.0)
            self.ema_sum.copy_(centres)
        self.initialized.fill_(True)

    @torch.no_grad()
    def observe(self, out: QuantizerOutput) -> None:
        """`CodeUsage.observe`, and for an EMA codebook the step's sums of assigned outputs."""
        idx, finite = super().observe(out)
        z = out.z[finite]
        if self.cfg.ema_decay > 0:
            sums = torch.zeros_like(self.ema_sum).index_add_(0, idx, z)
            self._pending_sums = sums if self._pending_sums is None else self._pending_sums + sums
        self._candidates = out.z  # restarts draw from the step's last forward

    @torch.no_grad()
    def update(self, codebook: torch.Tensor, step: int, stepped: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Once per optimizer step, after `observe` saw its forwards: usage bookkeeping, EMA
        codebook step, dead-code restarts.

        `stepped` (a device flag, the same on every process) says whether the optimizer step
        happened: a skipped step leaves every buffer and the codebook exactly as they were,
        as it leaves the weights. Call on every process with the same `step`; returns
        (detached logs: usage, perplexity, restarted; the indices of the restarted codes, the
        same on every process).
        """
        cfg = self.cfg
        # same on every rank; a skipped step counts no hits (so no usage, EMA or restart change)
        counts = self.count_step(step, stepped)
        perplexity = code_perplexity(counts).float()
        if cfg.ema_decay > 0:
            sums = reduce(self._pending_sums, "sum")
            ema_count = self.ema_count.lerp(counts.float(), 1 - cfg.ema_decay)
            ema_sum = self.ema_sum.lerp(sums, 1 - cfg.ema_decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0 (Sonnet's VQ-VAE-EMA)
            n = ema_count.sum()
            smoothed = (ema_count + 1e-5) / (n + self.num_codes * 1e-5) * n
            new = ema_sum / smoothed.unsqueeze(1)
            new = F.normalize(new, dim=1) if cfg.l2_normalize else new
            self.ema_count.copy_(torch.where(stepped, ema_count, self.ema_count))
            self.ema_sum.copy_(torch.where(stepped, ema_sum, self.ema_sum))
            codebook.copy_(torch.where(stepped, new.to(codebook.dtype), codebook))
        restarted = torch.zeros(0, dtype=torch.long, device=codebook.device)
        if cfg.restart_after_steps > 0:
            restarted = self._restart_dead(self._candidates, codebook, step, stepped)
        self._pending_sums = self._candidates = None
        logs = {"usage": self.usage(step), "perplexity": perplexity,
                "restarted": torch.tensor(float(len(restarted)), device=codebook.device)}
        return logs, restarted

    def _restart_dead(self, z: torch.Tensor, codebook: torch.Tensor, step: int, stepped: torch.Tensor) -> torch.Tensor:
        """Re-seed codes idle for more than `restart_after_steps` (none on a skipped step);
        returns their indices."""
        idle_since = torch.maximum(self.last_hit, self.last_restart)
        dead = torch.nonzero((step - idle_since > self.cfg.restart_after_steps) & stepped).flatten()
        if dead.numel() == 0:  # same decision on every rank: the buffers are identical
            return dead
        candidates = gather(z.contiguous())  # this batch's encoder outputs from every process
        candidates = candidates[torch.isfinite(candidates).all(1)]  # the same filter on every rank
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        n = min(dead.numel(), candidates.shape[0])  # the rest wait for the next batch
        dead = dead[:n]
        pick = torch.randperm(candidates.shape[0], generator=gen)[:n].to(candidates.device)
        codebook[dead] = candidates[pick].to(codebook.dtype)
        if self.cfg.ema_decay > 0:
            self.ema_count[dead] = 1.0
            self.ema_sum[dead] = candidates[pick]
        self.last_restart[dead] = step
        return dead

    @torch.no_grad()
    def renormalize_(self, codebook: torch.Tensor, stepped: torch.Tensor) -> None:
        """After an optimizer step (where `stepped`, a device flag: no host sync): put a
        cosine codebook back on the unit sphere, so the stored codebook is what stock
        VQModel's Euclidean lookup needs."""
        if self.cfg.l2_normalize:
            codebook.copy_(torch.where(stepped, F.normalize(codebook, dim=1), codebook))
