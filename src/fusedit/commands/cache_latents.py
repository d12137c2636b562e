"""``fusedit cache-latents``: encode training images with a VAE once and write latent shards + ``manifest.json``
(train from them with ``data.source=latents``, ``data.path=OUT``; :mod:`fusedit.data.latents`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fusedit.commands.values import positive_int

NAME = "cache-latents"
HELP = "precompute VAE latents into shards"
DESCRIPTION = (
    "Encode training images with a VAE once and write latent shards + manifest.json (train from them with "
    "data.source=latents, data.path=OUT)."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("overrides", nargs="*", help="key=value overrides of --config (e.g. data.resolution=512)")
    parser.add_argument(
        "--config",
        help="experiment config: its data section names the images (folder or "
        "webdataset shards), the VAE (data.vae, data.vae_subfolder, "
        "data.vae_sample_mode) and the transform",
    )
    parser.add_argument("--folder", help="image folder with captions.jsonl/csv (instead of --config)")
    parser.add_argument("--vae", help="diffusers VAE folder or hub id (with --folder)")
    parser.add_argument("--subfolder", default=None, help="VAE subfolder, e.g. 'vae' inside a pipeline folder")
    parser.add_argument("--resolution", type=positive_int, help="image side in pixels (with --folder)")
    parser.add_argument("--out", required=True, help="output folder of the cache")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--batch-size", type=positive_int, default=16, help="images per VAE call (default 16)")
    parser.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="storage dtype of latents")
    parser.add_argument("--tokenizer", help="also store token ids of the captions (tokenizer folder or hub id)")
    parser.add_argument(
        "--max-length", type=positive_int, default=None, help="truncate stored token ids to this length"
    )
    parser.add_argument("--device", default=None, help="where the VAE runs (default: cuda if available)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache in --out")


def _source_from_config(args: argparse.Namespace) -> tuple:
    from fusedit.data.folder import ImageFolderDataset
    from fusedit.data.webdataset import WebShardDataset
    from fusedit.experiment import load_experiment

    config = load_experiment(args.config, args.overrides)
    data = config.data
    dataset: ImageFolderDataset | WebShardDataset
    if data.source == "folder":
        assert data.path is not None  # the config's validation requires it
        dataset = ImageFolderDataset(
            data.path,
            resolution=data.resolution,
            center_crop=data.center_crop,
            interpolation=data.interpolation,
            seed=config.train.seed,
            on_bad="raise",
        )
    elif data.source == "webdataset":
        dataset = WebShardDataset.from_config(data, seed=config.train.seed, rank=0, world_size=1, epochs=1)
    else:
        raise ValueError(
            f"cache-latents: data.source={data.source!r}; the images must come from a 'folder' or 'webdataset' source"
        )
    if data.vae is None:
        raise ValueError("cache-latents: data.vae is null (pixel space); name a VAE in the config or with --vae")
    return dataset, data.vae, data.vae_subfolder, data.vae_sample_mode


def run(args: argparse.Namespace) -> int:
    """Encode the images, write the cache; prints the manifest path and the counts."""
    from fusedit.builders import default_device
    from fusedit.data.codec import load_codec
    from fusedit.data.folder import ImageFolderDataset
    from fusedit.data.latents import MANIFEST, cache_latents
    from fusedit.text.llm import load_tokenizer

    parser = args.parser
    if args.config is not None:
        if args.folder or args.resolution:
            parser.error("--config takes the images and resolution from the config; drop --folder/--resolution")
        dataset, vae, subfolder, sample_mode = _source_from_config(args)
        vae, subfolder = args.vae or vae, args.subfolder or subfolder
    else:
        if args.overrides:
            parser.error(f"key=value overrides ({' '.join(args.overrides)}) need --config")
        missing = [
            flag
            for flag, value in (("--folder", args.folder), ("--vae", args.vae), ("--resolution", args.resolution))
            if not value
        ]
        if missing:
            parser.error(f"give --config CONFIG, or --folder, --vae and --resolution (missing: {', '.join(missing)})")
        dataset = ImageFolderDataset(args.folder, resolution=args.resolution, on_bad="raise")
        vae, subfolder, sample_mode = args.vae, args.subfolder, "mean"
    tokenizer = None
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    codec = load_codec(vae, subfolder=subfolder, device=default_device(args.device), sample_mode=sample_mode)
    manifest = cache_latents(
        dataset,
        codec,
        args.out,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        tokenizer=tokenizer,
        max_length=args.max_length,
        dtype=args.dtype,
        overwrite=args.overwrite,
    )
    print(Path(args.out) / MANIFEST)
    print(
        f"{manifest['count']} latents in {len(manifest['shards'])} shard(s); skipped {manifest['skipped']} "
        f"unreadable item(s), {manifest['source_skipped']} corrupt sample(s) skipped by the source"
    )
    return 0
