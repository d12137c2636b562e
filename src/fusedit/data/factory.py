"""Build the training data set named by a config's ``data`` section."""
from __future__ import annotations

from fusedit.config import ConfigError
from fusedit.data.config import DataConfig


def build_dataset(config: DataConfig):
    """A map-style data set of ``{"image": (C, H, W), "caption": str}`` items for ``config.source``.

    ``shapes``: the embedded shapes world (its ``sample_prompts`` are held-out prompts for sample grids);
    ``folder``: images + captions.jsonl/csv.
    """
    if config.source == "shapes":
        from fusedit.data.shapes import ShapesWorld

        world = ShapesWorld(config.shapes, config.resolution)
        dataset = world.train_dataset()
        held_out = world.held_out_prompts()
        step = max(len(held_out) // 8, 1)
        dataset.sample_prompts = [spec.text for spec in held_out[::step][:8]]
        return dataset
    if config.source == "folder":
        from fusedit.data.folder import ImageFolderDataset

        return ImageFolderDataset(config.path, resolution=config.resolution, center_crop=config.center_crop)
    raise ConfigError(f"data.source={config.source}: streaming sources (webdataset shards, latent caches) are read "
                      f"by the distributed trainer (fusedit.dist); the single-process trainer takes 'shapes' or "
                      f"'folder'")
