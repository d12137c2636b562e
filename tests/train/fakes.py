"""Small fakes of the trainer's collaborators: a conv-net velocity model, text encoders and a dataset."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset


def caption_features(captions: list[str], dim: int = 8) -> torch.Tensor:
    """A deterministic (B, dim) embedding of captions (empty caption -> zeros)."""
    rows = []
    for c in captions:
        codes = torch.tensor([ord(ch) for ch in c] or [0], dtype=torch.float32)
        rows.append(torch.stack([torch.cos(codes * (k + 1) / 50).mean() * (len(c) > 0) for k in range(dim)]))
    return torch.stack(rows)


class FrozenTextEncoder(nn.Module):
    """encode -> (B, 8) context; has parameters (which must never be trained or saved)."""

    trainable = False

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def trainable_parameters(self):
        return iter(())

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.proj(caption_features(prompts))


class TrainableTextEncoder(FrozenTextEncoder):
    trainable = True

    def trainable_parameters(self):
        return self.proj.parameters()

    def freeze(self) -> None:
        """What ``train.llm_train_steps`` calls when the LLM stops training."""
        self.trainable = False
        self.proj.requires_grad_(False)


class TinyVelocityModel(nn.Module):
    """forward(x (B, 3, H, W), timestep (B,), context (B, 8)) -> (B, 3, H, W). Has dropout (global RNG; ``dropout=0``
    for runs that must not depend on per-process RNG) and ``blocks`` residual conv blocks in ``layers`` (what FSDP
    shards one by one)."""

    def __init__(self, channels: int = 3, hidden: int = 8, dropout: float = 0.1, blocks: int = 0) -> None:
        super().__init__()
        self.inp = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, hidden)
        self.text = nn.Linear(8, hidden)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)
        self.frozen = nn.Parameter(torch.ones(1), requires_grad=False)
        self.layers = nn.ModuleList([nn.Conv2d(hidden, hidden, 3, padding=1) for _ in range(blocks)])

    def forward(self, x, timestep, context):
        h = self.inp(x) + (self.time(timestep[:, None] / 1000) + self.text(context))[:, :, None, None]
        h = torch.nn.functional.silu(h)
        for block in self.layers:
            h = h + torch.nn.functional.silu(block(h))
        return self.out(self.drop(h)) * self.frozen


class ImageCaptionDataset(Dataset):
    """``n`` fixed random images (3, size, size) in [-1, 1] with captions."""

    def __init__(self, n: int = 10, size: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
        colors = ["red", "blue", "green"] * n
        self.captions = [f"a {c} square number {i}" for i, c in zip(range(n), colors, strict=False)]
        self.fetches = 0
        self.crash_after: int | None = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        self.fetches += 1
        if self.crash_after is not None and self.fetches > self.crash_after:
            raise RuntimeError("simulated crash")
        return {"image": self.images[i], "caption": self.captions[i]}


def write_image_shards(root, n_shards: int = 4, per_shard: int = 5, size: int = 8, corrupt: tuple = ()) -> list:
    """Tar shards in the reference's webdataset layout (PNG images, synthetic captions); ``corrupt``: global sample
    numbers whose image bytes are garbage. Returns the shard paths."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for s in range(n_shards):
        path = root / f"train-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                number = s * per_shard + i
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
                members = {
                    "image.png": b"garbage" if number in corrupt else buf.getvalue(),
                    "synthetic_caption.txt": f"a {['red', 'blue', 'green'][number % 3]} thing {number}".encode(),
                }
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{number:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


class EpochRecordingDataset(ImageCaptionDataset):
    """Records ``(epoch, index)`` of every fetch; ``set_epoch`` like ``ImageFolderDataset``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.epoch = 0
        self.seen: list[tuple[int, int]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        self.seen.append((self.epoch, i))
        return super().__getitem__(i)


def crash_then_resume(make_trainer, cfg, root) -> tuple:
    """An uninterrupted run of ``cfg`` in ``root/full`` and one in ``root/resumed`` whose data crash during step 5 (at
    ``cfg.batch_size`` 4, with a checkpoint at step 3), resumed by a trainer with other initial weights.
    ``make_trainer(run_dir, cfg, model_seed=0, dataset=None)`` builds each trainer. Returns ``(full, full_losses,
    resumed, resumed_losses)``."""
    full = make_trainer(root / "full", cfg)
    full_losses = full.fit().losses
    crashing = ImageCaptionDataset()
    crashing.crash_after = 4 * 4 + 1  # during step 5; the last checkpoint is step 3
    try:
        make_trainer(root / "resumed", cfg, dataset=crashing).fit()
    except RuntimeError as error:
        assert "simulated crash" in str(error)
    else:
        raise AssertionError("the crashing run did not crash")
    resumed = make_trainer(root / "resumed", cfg, model_seed=7)
    return full, full_losses, resumed, resumed.fit().losses
