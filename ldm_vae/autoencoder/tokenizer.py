"""`Tokenizer`: images <-> integer token grids with an exported VQ model.

The interface autoregressive and masked generative models consume: `encode` gives a
LongTensor [B, h, w] of codebook indices, `decode` turns such a grid back into images. It
wraps a stock diffusers `VQModel` (any `VQModel.from_pretrained` folder works, not only
ldm-vae exports) and picks codes the way `VQModel.decode` does (Euclidean nearest code),
but in memory-safe chunks instead of one [tokens x codes] `cdist`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import VQModel

from ..errors import UserError
from .models import code_indices


class Tokenizer:
    def __init__(self, vq: VQModel):
        self.vq = vq.eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, **kwargs) -> "Tokenizer":
        """Load a `VQModel` folder (kwargs go to `VQModel.from_pretrained`; safetensors by default)."""
        vq = VQModel.from_pretrained(path, **{"use_safetensors": True, **kwargs})
        return cls(vq.to(device) if device is not None else vq)

    @property
    def codebook_size(self) -> int:
        return self.vq.config.num_vq_embeddings

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.vq.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.vq.device

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] -> token ids [B, H/f, W/f] (int64)."""
        if images.ndim != 4 or images.shape[1] != self.vq.config.in_channels:
            raise UserError(f"Tokenizer.encode expects images [B, {self.vq.config.in_channels}, H, W] in [-1, 1], "
                            f"got shape {tuple(images.shape)}")
        f = self.downsampling_factor
        if images.shape[-1] % f or images.shape[-2] % f:
            raise UserError(f"image height and width must be multiples of the downsampling factor {f}, "
                            f"got {tuple(images.shape[-2:])}")
        latents = self.vq.encode(images.to(self.device, self.vq.dtype)).latents
        return code_indices(self.vq, latents)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, h, w] -> images [B, C, h*f, w*f] (about [-1, 1]; not clamped)."""
        if ids.ndim != 3 or ids.dtype not in (torch.int64, torch.int32):
            raise UserError(f"Tokenizer.decode expects integer token ids [B, h, w], got {ids.dtype} "
                            f"of shape {tuple(ids.shape)}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.codebook_size):
            raise UserError(f"token ids must be in [0, {self.codebook_size}), got values in "
                            f"[{int(ids.min())}, {int(ids.max())}]")
        codes = self.vq.quantize.embedding(ids.to(self.device).long()).permute(0, 3, 1, 2)
        # the codes are already quantized: decode them as they are
        return self.vq.decode(codes, force_not_quantize=True).sample
