"""Codecs: what turns training images into model inputs and model outputs back into images.

A codec has ``encode(images (B, 3, H, W) in [-1, 1]) -> (B, C, H/f, W/f)`` and
``decode(latents (B, C, h, w)) -> images (B, 3, h·f, w·f)`` in [-1, 1], plus ``channels`` (C), ``spatial_factor``
(f), ``name`` and ``describe()`` (a JSON-able dict written into latent-cache manifests and checkpoints).

* :class:`PixelCodec` — identity (pixel space, the shapes world): C = 3, f = 1.
* :class:`VAECodec` — any diffusers autoencoder with ``encode``/``decode`` (``AutoencoderKL`` such as SD3's VAE,
  ``AutoencoderDC``...). Latents are normalised as ``(z - shift_factor) · scaling_factor`` (shift 0 when the VAE
  config has none; SD3: shift 0.0609, scale 1.5305) and un-normalised before decoding.
  ``f = 2 ** (len(block_out_channels) - 1)``. For a Gaussian posterior (``AutoencoderKL``) the latent is either
  its mean (``sample_mode="mean"``, deterministic, what latent caches store) or a draw ``mean + std·ε``
  (``sample_mode="sample"``, with an optional ``torch.Generator``).

The VAE is frozen: ``eval()``, ``requires_grad_(False)``, and encode/decode run under ``torch.no_grad()``.
Inputs are cast to the VAE's dtype/device; outputs are float32 on the VAE's device.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal, Protocol, runtime_checkable

import torch

__all__ = ["Codec", "PixelCodec", "VAECodec", "load_codec", "resolve_dtype", "SAMPLE_MODES"]

SAMPLE_MODES = ("mean", "sample")
_PIXEL_NAMES = ("pixel", "pixels", "none", "identity")
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


@runtime_checkable
class Codec(Protocol):
    """What the trainer, the pipeline and the latent cache need from a codec."""

    name: str
    channels: int
    spatial_factor: int

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict[str, Any]: ...


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``torch.float32``/``"fp32"``/``"bf16"``/``"bfloat16"``/``"fp16"``... → a ``torch.dtype`` (None → float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"dtype: got {dtype!r}, expected one of {sorted(_DTYPES)}") from None


def _check_images(images: torch.Tensor, factor: int, who: str) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{who}.encode: expected images of shape (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{who}.encode: expected float images in [-1, 1], got dtype {images.dtype}")
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"{who}.encode: image size {h}x{w} is not divisible by the spatial factor {factor}")


class PixelCodec:
    """Identity codec for pixel-space models: ``encode``/``decode`` return float32 copies (decode clamps to [-1, 1])."""

    name = "pixel"
    channels = 3
    spatial_factor = 1

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → the same values as float32."""
        _check_images(images, 1, "PixelCodec")
        return images.float().clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` → float32 clamped to [-1, 1]."""
        if latents.dim() != 4 or latents.shape[1] != 3:
            raise ValueError(f"PixelCodec.decode: expected (B, 3, H, W), got {tuple(latents.shape)}")
        return latents.float().clamp(-1.0, 1.0)

    def to(self, device=None, dtype=None) -> PixelCodec:
        return self

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": "PixelCodec",
            "channels": 3,
            "spatial_factor": 1,
            "scaling_factor": 1.0,
            "shift_factor": 0.0,
        }

    def __repr__(self) -> str:
        return "PixelCodec()"


class VAECodec:
    """A frozen diffusers autoencoder with normalised latents.

    Args:
        vae: a diffusers autoencoder (``AutoencoderKL``, ``AutoencoderDC``...) with ``encode``/``decode``.
        sample_mode: ``"mean"`` (posterior mean; deterministic) or ``"sample"`` (``mean + std·ε``).
            Ignored by autoencoders without a Gaussian posterior.
        scaling_factor, shift_factor: override the VAE config's values (``shift_factor`` None in the config → 0).
        name: recorded in manifests (defaults to the VAE's ``_name_or_path`` or class name).
    """

    def __init__(
        self,
        vae: Any,
        sample_mode: Literal["mean", "sample"] = "mean",
        scaling_factor: float | None = None,
        shift_factor: float | None = None,
        name: str | None = None,
    ):
        if not (hasattr(vae, "encode") and hasattr(vae, "decode")):
            raise TypeError(f"VAECodec: {type(vae).__name__} has no encode/decode methods")
        if sample_mode not in SAMPLE_MODES:
            raise ValueError(f"VAECodec: sample_mode got {sample_mode!r}, expected one of {SAMPLE_MODES}")
        config = getattr(vae, "config", {})
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        if scaling_factor is None:
            scaling_factor = get("scaling_factor", None)
        if scaling_factor is None:
            raise ValueError(f"VAECodec: {type(vae).__name__}'s config has no scaling_factor; pass scaling_factor=")
        if shift_factor is None:
            shift_factor = get("shift_factor", None) or 0.0
        channels = get("latent_channels", None)
        if channels is None:
            raise ValueError(f"VAECodec: {type(vae).__name__}'s config has no latent_channels")
        blocks = get("block_out_channels", None) or get("encoder_block_out_channels", None)
        if blocks:
            factor = 2 ** (len(blocks) - 1)
        elif getattr(vae, "spatial_compression_ratio", None):
            factor = int(vae.spatial_compression_ratio)
        else:
            raise ValueError(
                f"VAECodec: cannot tell {type(vae).__name__}'s spatial factor (no block_out_channels in its config)"
            )
        self.vae = vae.eval().requires_grad_(False)
        self.sample_mode = sample_mode
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = float(shift_factor)
        self.channels = int(channels)
        self.spatial_factor = int(factor)
        self.name = name or get("_name_or_path", None) or type(vae).__name__

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(self, device=None, dtype=None) -> VAECodec:
        """Move/cast the VAE (returns self)."""
        self.vae.to(device=device, dtype=resolve_dtype(dtype) if dtype is not None else None)
        return self

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents → model latents: ``(z - shift_factor) · scaling_factor``."""
        return (z - self.shift_factor) * self.scaling_factor

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Model latents → raw VAE latents: ``latents / scaling_factor + shift_factor``."""
        return latents / self.scaling_factor + self.shift_factor

    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        sample_mode: Literal["mean", "sample"] | None = None,
    ) -> torch.Tensor:
        """``(B, 3, H, W)`` in [-1, 1] → normalised latents ``(B, C, H/f, W/f)`` float32.

        ``sample_mode`` overrides the codec's mode for this call; ``generator`` drives ``"sample"``
        (it must live on the VAE's device).
        """
        _check_images(images, self.spatial_factor, "VAECodec")
        mode = sample_mode or self.sample_mode
        if mode not in SAMPLE_MODES:
            raise ValueError(f"VAECodec.encode: sample_mode got {mode!r}, expected one of {SAMPLE_MODES}")
        out = self.vae.encode(images.to(device=self.device, dtype=self.dtype))
        if isinstance(out, tuple):
            out = out[0]
        dist = getattr(out, "latent_dist", None)
        if dist is None and hasattr(out, "mode") and hasattr(out, "sample"):
            dist = out
        if dist is not None:
            z = dist.mode() if mode == "mean" else dist.sample(generator=generator)
        elif hasattr(out, "latent"):
            z = out.latent
        elif isinstance(out, torch.Tensor):
            z = out
        else:
            raise TypeError(f"VAECodec: unsupported encode() output {type(out).__name__}")
        return self.normalize(z.float())

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents ``(B, C, h, w)`` → images ``(B, 3, h·f, w·f)`` float32 clamped to [-1, 1]."""
        if latents.dim() != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"VAECodec.decode: expected (B, {self.channels}, h, w), got {tuple(latents.shape)}")
        z = self.denormalize(latents.float()).to(device=self.device, dtype=self.dtype)
        out = self.vae.decode(z)
        images = out.sample if hasattr(out, "sample") else out[0]
        return images.float().clamp(-1.0, 1.0)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": type(self.vae).__name__,
            "channels": self.channels,
            "spatial_factor": self.spatial_factor,
            "scaling_factor": self.scaling_factor,
            "shift_factor": self.shift_factor,
            "sample_mode": self.sample_mode,
        }

    def __repr__(self) -> str:
        return (
            f"VAECodec({self.name!r}, channels={self.channels}, factor={self.spatial_factor}, "
            f"scale={self.scaling_factor}, shift={self.shift_factor}, mode={self.sample_mode})"
        )


def _looks_like_local_path(name: str) -> bool:
    if name.startswith((".", "/", "~")) or "\\" in name or name.endswith("/"):
        return True
    return name.count("/") != 1  # hub ids are exactly "owner/name"


def load_codec(
    name_or_path: str | os.PathLike | None,
    subfolder: str | None = None,
    dtype: str | torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
    sample_mode: Literal["mean", "sample"] = "mean",
) -> PixelCodec | VAECodec:
    """Build the codec named by a config: ``None``/``"pixel"`` → :class:`PixelCodec`; otherwise load a diffusers
    autoencoder from a local folder or a hub id (``subfolder`` e.g. ``"vae"`` inside a pipeline repo) into a
    :class:`VAECodec` on ``device`` in ``dtype``.

    Raises:
        FileNotFoundError: a local path (or its subfolder, or its ``config.json``) does not exist.
        OSError: a hub id that cannot be loaded (not cached locally and no network, or no such repo).
    """
    if name_or_path is None or str(name_or_path).lower() in _PIXEL_NAMES:
        return PixelCodec()
    from diffusers import AutoModel

    name = os.fspath(name_or_path)
    torch_dtype = resolve_dtype(dtype)
    if sample_mode not in SAMPLE_MODES:
        raise ValueError(f"load_codec: sample_mode got {sample_mode!r}, expected one of {SAMPLE_MODES}")
    local = os.path.expanduser(name)
    if os.path.exists(local) or _looks_like_local_path(name):
        folder = os.path.join(local, subfolder) if subfolder else local
        if not os.path.isdir(local):
            raise FileNotFoundError(f"VAE folder not found: {name}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"VAE subfolder {subfolder!r} not found in {name} "
                f"(it has: {', '.join(sorted(os.listdir(local))) or 'nothing'})"
            )
        if not os.path.isfile(os.path.join(folder, "config.json")):
            hint = " (set vae_subfolder: vae?)" if os.path.isdir(os.path.join(folder, "vae")) else ""
            raise FileNotFoundError(f"no config.json in VAE folder {folder}{hint}")
        with open(os.path.join(folder, "config.json")) as f:
            class_name = json.load(f).get("_class_name", "?")
        vae = AutoModel.from_pretrained(folder, torch_dtype=torch_dtype)
    else:
        try:
            vae = AutoModel.from_pretrained(name, subfolder=subfolder, torch_dtype=torch_dtype)
        except OSError as exc:
            raise OSError(
                f"cannot load VAE {name!r} (subfolder={subfolder!r}) from the hub or its local cache: {exc}"
            ) from exc
        class_name = type(vae).__name__
    if not (hasattr(vae, "encode") and hasattr(vae, "decode")):
        raise TypeError(f"{name}: {class_name} is not an autoencoder (no encode/decode)")
    label = name if not subfolder else f"{name}:{subfolder}"
    return VAECodec(vae.to(device), sample_mode=sample_mode, name=label)
