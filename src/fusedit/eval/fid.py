"""Fréchet Inception Distance (FID) between two image folders, and the Fréchet distance itself.

``compute_fid`` streams both folders through a feature extractor into torchmetrics'
``FrechetInceptionDistance`` (running sums of features and their outer products, float64).

Feature extractors. A feature extractor is any ``nn.Module`` mapping a ``uint8`` batch
``(B, 3, S, S)`` (values 0..255, ``S = image_size``) to features ``(B, D)``.

* Default (``feature_extractor=None``): the standard FID Inception-v3 (TF 2015-12-05 weights, 2048-d pool
  features) as torchmetrics' ``NoTrainInceptionV3`` (torch-fidelity's network). Its weights are read from the
  local file ``inception_weights`` — torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` — so no
  download happens at run time. This path needs the ``torch-fidelity`` package, which imports torchvision;
  when it is missing, :func:`load_fid_inception` raises an ``ImportError`` that says what to install.
* Custom: pass ``feature_extractor=`` (any module following the contract above); nothing else is needed.

Preprocessing. Every image is converted to RGB and resized (no crop) to ``image_size``² with PIL bicubic
(antialiased), as clean-fid's "clean" mode does (the reference scores MJHQ-30K with clean-fid). Unlike
clean-fid, the resized image is quantised to uint8 before the network, so numbers are close to, not
bit-identical with, clean-fid's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fusedit.eval.images import iter_uint8_batches, list_images

#: File name torch-fidelity publishes the FID Inception weights under.
INCEPTION_WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of features ``(N, D)``, ``N >= 2``."""
    feats = np.asarray(torch.as_tensor(features).detach().cpu().double().numpy())
    if feats.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {feats.shape}")
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {feats.shape[0]}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians: ``‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½)``.

    ``tr((Σ1Σ2)^½)`` is the sum of the square roots of the eigenvalues of ``Σ1Σ2`` (which are real
    and non-negative for covariance matrices, up to round-off), computed in float64.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1:
        raise ValueError(f"means must be vectors of one shape, got {mu1.shape} and {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    eigenvalues = np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    trace_sqrt = np.sqrt(eigenvalues).real.sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def fid_from_features(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets ``(N_a, D)`` and ``(N_b, D)``."""
    mu_a, sigma_a = feature_statistics(feats_a)
    mu_b, sigma_b = feature_statistics(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"feature sets differ in dimension: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return frechet_distance(mu_a, sigma_a, mu_b, sigma_b)


def load_fid_inception(weights_path: str | os.PathLike | None) -> nn.Module:
    """The standard FID Inception-v3 (2048-d features) with weights from a local file.

    Args:
        weights_path: torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` on local disk.

    Raises:
        ValueError: ``weights_path`` is None (no download is ever attempted).
        FileNotFoundError: the weights file does not exist.
        ImportError: torch-fidelity (and with it torchvision) is not installed.
    """
    if weights_path is None:
        raise ValueError(
            "standard FID features need local Inception weights: pass inception_weights=<path to "
            f"{INCEPTION_WEIGHTS_NAME}> (torch-fidelity's release asset), or pass feature_extractor="
        )
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"Inception weights file {str(path)!r} does not exist")
    try:
        import torch_fidelity  # noqa: F401  (imports torchvision)
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as error:
        raise ImportError(
            "the standard FID Inception network comes from torch-fidelity, which imports torchvision; "
            "install both (`pip install torch-fidelity` plus the torchvision build matching your torch), "
            f"or pass compute_fid(feature_extractor=...) instead. ({error})"
        ) from error
    return NoTrainInceptionV3(
        name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=str(path)
    )


class _CheckedExtractor(nn.Module):
    """Wraps a feature extractor and checks it returns ``(B, D)`` features for a ``(B, 3, S, S)`` batch."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.extractor(images)
        if isinstance(features, (tuple, list)) and len(features) == 1:
            features = features[0]
        if not torch.is_tensor(features) or features.ndim != 2 or features.shape[0] != images.shape[0]:
            shape = tuple(features.shape) if torch.is_tensor(features) else type(features).__name__
            raise ValueError(f"feature extractor must return (B, D) = ({images.shape[0]}, D) features, got {shape}")
        return features


@torch.no_grad()
def compute_fid(
    real_dir: str | os.PathLike,
    fake_dir: str | os.PathLike,
    *,
    feature_extractor: nn.Module | None = None,
    inception_weights: str | os.PathLike | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    image_size: int = 299,
) -> float:
    """FID between the images under ``real_dir`` and under ``fake_dir`` (both searched recursively).

    Args:
        real_dir, fake_dir: folders of images (png/jpg/jpeg/webp/bmp; sub-folders included, e.g. MJHQ
            categories); each must hold at least 2 images.
        feature_extractor: module mapping uint8 ``(B, 3, image_size, image_size)`` to ``(B, D)``;
            None = the standard FID Inception (needs ``inception_weights``, see :func:`load_fid_inception`).
        inception_weights: local path of the FID Inception weights (only used when
            ``feature_extractor`` is None).
        batch_size: images per feature-extractor call.
        device: where the feature extractor runs.
        image_size: square size every image is resized to (bicubic) before feature extraction.

    Returns:
        The FID as a Python float.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    real_paths, fake_paths = list_images(real_dir), list_images(fake_dir)
    for name, paths, folder in (("real", real_paths, real_dir), ("fake", fake_paths, fake_dir)):
        if len(paths) < 2:
            raise ValueError(f"FID needs at least 2 {name} images, {str(folder)!r} has {len(paths)}")
    extractor = feature_extractor if feature_extractor is not None else load_fid_inception(inception_weights)
    extractor = _CheckedExtractor(extractor).eval()
    metric = FrechetInceptionDistance(
        feature=extractor, input_img_size=(3, image_size, image_size), reset_real_features=True
    ).to(device)
    for paths, real in ((real_paths, True), (fake_paths, False)):
        for batch in iter_uint8_batches(paths, batch_size=batch_size, image_size=image_size):
            metric.update(batch.to(device), real=real)
    return float(metric.compute())
