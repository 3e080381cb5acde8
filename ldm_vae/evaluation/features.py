"""A domain feature extractor for Fréchet distances where Inception does not apply.

FID's Inception network was trained on ImageNet photos; on 32x32 grayscale clothes (or
offline, without its weights) a small classifier trained on the domain's own labels gives
features that separate what matters there. `ldm-vae train-fd-features` trains one and
saves it (feature layer and, as `logits`, its classifier) as a folder of safetensors weights
and config.json (huggingface_hub's PyTorchModelHubMixin: `FeatureExtractor.from_pretrained`,
`push_to_hub`); `ldm-vae eval --fd-features PATH` reports the distance under the extractor's
own name (`fd_<name>`), never as "FID".
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data.config import DataConfig
from ..data.sources import build_dataset
from ..errors import UserError
from ..files import atomic_folder


class FeatureNet(nn.Module):
    """conv(32) -> conv(64) -> conv(128) -> global average pool: `num_features` = 128.

    Input: images [N, 3, R, R] in [-1, 1]. GroupNorm, so features of one image do not
    depend on the rest of the batch.
    """

    def __init__(self, width: int = 32):
        super().__init__()
        layers, cin = [], 3
        for cout in (width, width * 2, width * 4):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                       nn.Conv2d(cout, cout, 3, padding=1, stride=2), nn.GroupNorm(8, cout), nn.SiLU()]
            cin = cout
        self.body = nn.Sequential(*layers)
        self.num_features = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))


class FeatureExtractor(nn.Module, PyTorchModelHubMixin, library_name="ldm-vae", tags=["fd-features"]):
    """What is saved: `forward` gives the features, `logits` the classifier's class scores
    (the demo uses them to check that samples of a class look like that class). The init
    arguments are the saved config.json."""

    def __init__(self, name: str, resolution: int, num_classes: int, width: int = 32):
        super().__init__()
        self.name, self.resolution = name, resolution
        self.net = FeatureNet(width)
        self.head = nn.Linear(self.net.num_features, num_classes)
        self.num_features = self.net.num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x))


def train_fd_features(data: DataConfig, out: str | Path, name: str, steps: int = 2000, batch_size: int = 128,
                      lr: float = 2e-3, seed: int = 0, device: str = "cpu", overwrite: bool = False) -> dict:
    """Train FeatureNet + a linear classifier on `data`'s labels; save both as the folder `out`."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists; choose another --out or pass --overwrite")
    train_ds = build_dataset(data, data.train_split, train=True, seed=seed)
    if not train_ds.has_labels:
        raise UserError(f"{train_ds.description} has no integer labels; a feature extractor needs a labelled "
                        f"dataset (data.label_column)")
    test_ds = build_dataset(data, data.test_split, train=False)
    num_classes = int(max(train_ds[i]["label"] for i in range(min(len(train_ds), 5000)))) + 1
    torch.manual_seed(seed)
    model = FeatureExtractor(name, data.resolution, num_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    step, epoch = 0, 0
    progress = tqdm(total=steps, desc="train-fd-features")
    while step < steps:
        train_ds.set_epoch(epoch)
        for batch in loader:
            logits = model.logits(batch["pixel_values"].to(device))
            loss = F.cross_entropy(logits, batch["label"].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            progress.update(1)
            if step % 50 == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}")
            if step >= steps:
                break
        epoch += 1
    progress.close()

    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in DataLoader(test_ds, batch_size=500):
            correct += (model.logits(batch["pixel_values"].to(device)).argmax(1).cpu() == batch["label"]).sum().item()
    meta = {"name": name, "resolution": data.resolution, "num_features": model.num_features,
            "input": "images [N, 3, R, R] in [-1, 1]", "dataset": train_ds.description,
            "steps": steps, "test_accuracy": correct / len(test_ds)}
    if out.is_file():  # --overwrite of an extractor in the old single-file (TorchScript) format
        out.unlink()
    with atomic_folder(out) as tmp:
        model.cpu().eval().save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(meta, indent=2))
    return meta
