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


def _config_vae(args: argparse.Namespace) -> tuple:
    """``(config, vae, subfolder, sample mode)`` of ``--config`` (the images are built once the VAE is loaded)."""
    from fusedit.experiment import load_experiment

    config = load_experiment(args.config, args.overrides)
    data = config.data
    if data.source not in ("folder", "webdataset"):
        raise ValueError(
            f"cache-latents: data.source={data.source!r}; the images must come from a 'folder' or 'webdataset' source"
        )
    if data.vae is None and not args.vae:
        raise ValueError("cache-latents: data.vae is null (pixel space); name a VAE in the config or with --vae")
    return config, data.vae, data.vae_subfolder, data.vae_sample_mode


def _config_dataset(config, codec) -> tuple:
    """``(data set, per_bucket)`` of the config's folder or webdataset source; with ``data.buckets.enabled`` each
    image comes at its bucket's size (checked against ``codec``) and the cache is written per bucket."""
    from fusedit.data.bucket_folder import BucketedImageFolder
    from fusedit.data.buckets import training_buckets
    from fusedit.data.folder import ImageFolderDataset
    from fusedit.data.webdataset import WebShardDataset

    data, seed = config.data, config.train.seed
    buckets = training_buckets(config, codec)
    dataset: ImageFolderDataset | WebShardDataset
    if data.source == "webdataset":
        dataset = WebShardDataset.from_config(data, seed=seed, rank=0, world_size=1, epochs=1, buckets=buckets)
    elif buckets is not None:
        assert data.path is not None  # the config's validation requires it
        dataset = BucketedImageFolder(
            data.path,
            buckets,
            center_crop=data.center_crop,
            interpolation=data.interpolation,
            seed=seed,
            on_bad="raise",
        )
    else:
        assert data.path is not None
        dataset = ImageFolderDataset(
            data.path,
            resolution=data.resolution,
            center_crop=data.center_crop,
            interpolation=data.interpolation,
            seed=seed,
            on_bad="raise",
        )
    return dataset, buckets is not None


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
        config, vae, subfolder, sample_mode = _config_vae(args)
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
        config, vae, subfolder, sample_mode = None, args.vae, args.subfolder, "mean"
    tokenizer = None
    if args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
    codec = load_codec(vae, subfolder=subfolder, device=default_device(args.device), sample_mode=sample_mode)
    per_bucket = False
    if config is not None:
        dataset, per_bucket = _config_dataset(config, codec)
    else:
        dataset = ImageFolderDataset(args.folder, resolution=args.resolution, on_bad="raise")
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
        per_bucket=per_bucket,
    )
    print(Path(args.out) / MANIFEST)
    print(
        f"{manifest['count']} latents in {len(manifest['shards'])} shard(s); skipped {manifest['skipped']} "
        f"unreadable item(s), {manifest['source_skipped']} corrupt sample(s) skipped by the source"
    )
    for bucket in manifest.get("buckets") or []:
        h, w = bucket["image_size"]
        print(f"  bucket {h}x{w}: {bucket['count']} latent(s) of shape {bucket['latent_shape']}")
    return 0
