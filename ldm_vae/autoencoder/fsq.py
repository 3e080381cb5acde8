"""The training-time quantizer of `model.kind: fsq` and `model.kind: lfq`: a fixed grid of
codes, so there is no codebook to learn, initialise or restart.

FSQ (Mentzer et al. 2023, arXiv:2309.15505) rounds each of D latent dimensions to one of L_d
levels. LFQ (MAGVIT-v2, Yu et al. 2023, arXiv:2310.05737) is the case L_d = 2 in every
dimension, codes {-1, +1}^K, trained with an entropy loss. Both export as a stock diffusers
`VQModel` whose codebook is the materialised grid (prod L_d rows of D values), so stock
`VQModel.decode` quantizes with its own Euclidean lookup and needs nothing of ours.

Why that lookup picks our code: for a product grid ||z - c||^2 = sum_d (z_d - c_d)^2 is
minimised dimension by dimension, i.e. by rounding each z_d to its nearest level. That holds
for every z only if rounding happens in z's own coordinates, with the levels where rounding
puts them: here evenly spaced in [-1, 1] (two levels: -1 and +1, the nearest being the
sign), and the bound a clamp to that interval (a value past the end rounds to the end level,
which is also its nearest). FSQ's tanh bound rounds tanh(z), whose nearest level is not the
grid point nearest to z, and a stock VQModel applies no tanh before its lookup. The
commitment term pulls values outside [-1, 1] back in.

Codes are numbered in mixed radix, dimension 0 least significant (FSQ's and MAGVIT-v2's
order): index = sum_d digit_d * prod_{j<d} L_j.
"""

from __future__ import annotations

import math

import torch

from .config import QuantizerConfig
from .quantize import CodeUsage, QuantizerOutput, code_perplexity, straight_through


def level_values(levels: int) -> torch.Tensor:
    """The levels of one dimension: `levels` values evenly spaced in [-1, 1] (fp32)."""
    return torch.linspace(-1.0, 1.0, levels, dtype=torch.float64).float()


def split_dimensions(levels: list[int]) -> int:
    """The split point s (1 <= s <= D) that makes prod(levels[:s]) and prod(levels[s:]) closest
    in size: the batch entropy multiplies the two halves' soft assignments (see level_entropy).
    s = D (an empty second half) wins only for one dimension."""
    return min(range(1, len(levels) + 1),
               key=lambda s: abs(math.log(math.prod(levels[:s])) - math.log(math.prod(levels[s:]))))


def _joint(joint: torch.Tensor, probs: list[torch.Tensor]) -> torch.Tensor:
    """[N, prod L_d]: the soft assignment to every code of these dimensions (product of one
    softmax per dimension), in mixed radix with the first dimension least significant;
    `joint` starts as ones [N, 1] (no dimensions: one code)."""
    for p in probs:  # [N, codes so far] x [N, L_d] -> [N, L_d * codes so far], d the slower digit
        joint = (p.unsqueeze(2) * joint.unsqueeze(1)).flatten(1)
    return joint


def level_entropy(z: torch.Tensor, values: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """MAGVIT-v2's entropy loss (arXiv:2310.05737, eq. 5) for a product grid: mean per-token
    entropy of the soft assignment minus the entropy of its batch mean, both exact.

    The soft assignment softmax(-||z - c||^2 / t) over a product grid is the product of one
    softmax per dimension, so the per-token entropy is the sum of the dimensions' entropies.
    The batch mean over all prod L_d codes is one matrix product: with the dimensions split
    in two halves A and B, mean_n p(a, b | n) = (P_A^T P_B / N)[a, b], where P_A [N, codes of
    A] is A's joint soft assignment. That costs N x |A| x |B| multiply-adds and never holds an
    [N x codes] matrix (2^18 codes: two [N, 512] factors). Why not a sum of entropies over
    groups of dimensions, as Open-MAGVIT2 factorises its 2^18 codes: that bound leaves the
    dependence between groups free, and on Fashion-MNIST the encoder used it (the last
    dimension of 8x8x8x8x4 followed two others with correlation 0.55 and 0.43, and LFQ's 2-bit
    group followed a bit of the 12-bit one with 0.78): 9% and 24% of the codes went unused.
    """
    probs, per_token = [], 0.0
    for d, v in enumerate(values):
        logits = -(z[:, d:d + 1] - v).pow(2) / temperature  # [N, L_d]
        logp = logits.log_softmax(1)
        probs.append(logp.exp())
        per_token = per_token - (probs[-1] * logp).sum(1).mean()
    s = split_dimensions([len(v) for v in values])
    ones = z.new_ones(z.shape[0], 1)
    mean = (_joint(ones, probs[:s]).T @ _joint(ones, probs[s:])) / z.shape[0]  # [codes of A, codes of B]
    batch = -(mean * torch.log(mean.clamp_min(1e-12))).sum()
    return per_token - batch


class ScalarQuantizer(CodeUsage):
    """Rounds `VQModel.encode(x).latents` (D = len(levels) channels) to the grid and keeps
    the usage bookkeeping; `prepare_codebook` writes the grid into VQModel's codebook."""

    initialized = True  # nothing to initialise from data (the trainer's k-means is for learned codebooks)

    def __init__(self, levels: list[int], cfg: QuantizerConfig):
        super().__init__(math.prod(levels), cfg)
        self.levels = list(levels)
        width = max(levels)
        table = torch.zeros(len(levels), width)
        for d, n in enumerate(levels):
            table[d, :n] = level_values(n)
        # derived from the config, so not in checkpoints
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("offsets", torch.arange(len(levels)) * width, persistent=False)
        self.register_buffer("top", torch.tensor(levels) - 1, persistent=False)
        self.register_buffer("basis", torch.tensor([math.prod(levels[:d]) for d in range(len(levels))]),
                             persistent=False)

    def grid(self) -> torch.Tensor:
        """[prod L, D]: row i is the code with index i."""
        index = torch.arange(self.num_codes, device=self.basis.device).unsqueeze(1)
        digits = index // self.basis % (self.top + 1)
        return self.table.flatten()[digits + self.offsets]

    def prepare_codebook(self, codebook: torch.Tensor) -> None:
        """Before training: the codebook becomes the grid, fixed (no optimizer moves it)."""
        with torch.no_grad():
            codebook.copy_(self.grid().to(codebook))
        codebook.requires_grad_(False)

    def digits(self, z: torch.Tensor) -> torch.Tensor:
        """[N, D] level numbers of the nearest grid point (z [N, D], fp32)."""
        u = (z + 1) * (self.top / 2)  # level units: level k sits at u = k
        # ceil(u - 1/2) rounds a tie down, to the lower index, as argmin's first-minimum rule does
        return torch.minimum(torch.ceil(u - 0.5).clamp_min(0), self.top).long()

    def forward(self, h: torch.Tensor, codebook: torch.Tensor | None = None) -> QuantizerOutput:
        d = h.shape[1]
        cfg = self.cfg
        with torch.autocast(h.device.type, enabled=False):  # fp32: bf16 would round to other levels
            z = h.float().permute(0, 2, 3, 1).reshape(-1, d)
            digits = self.digits(z.detach())
            zq = self.table.flatten()[digits + self.offsets]
            idx = (digits * self.basis).sum(1)
            commitment = (z - zq).pow(2).mean()
            loss = cfg.beta * commitment
            logs = {"vq_commitment": commitment}
            if cfg.entropy_weight > 0:
                values = [self.table[i, :n] for i, n in enumerate(self.levels)]
                ent = level_entropy(z, values, cfg.entropy_temperature)
                loss = loss + cfg.entropy_weight * ent
                logs["vq_entropy"] = ent
            return straight_through(z, zq, idx, h.shape, loss, logs)  # as FSQ's rounding (sec. 3)

    @torch.no_grad()
    def update(self, codebook: torch.Tensor, step: int, stepped: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Once per optimizer step: usage bookkeeping (the grid itself never changes); the
        same return as `VectorQuantizer.update`, with no restarted codes."""
        counts = self.count_step(step, stepped)
        logs = {"usage": self.usage(step), "perplexity": code_perplexity(counts).float(),
                "restarted": torch.zeros((), device=counts.device)}
        return logs, torch.zeros(0, dtype=torch.long, device=counts.device)

    def renormalize_(self, codebook: torch.Tensor, stepped: torch.Tensor) -> None:
        """Nothing to do: the grid is fixed."""
