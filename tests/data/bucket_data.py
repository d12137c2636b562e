"""Images of several aspect ratios, as a folder and as tar shards, for the bucket tests."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image

#: (width, height) of image ``i``: cycles through wide, tall, square and near-square sizes
SIZES = [(24, 12), (12, 24), (16, 16), (26, 12), (12, 22), (18, 16), (20, 10)]
#: (height, width) buckets the sizes above fall into: wide, tall, square
BUCKETS = [(8, 16), (16, 8), (12, 12)]


def image_bytes(i: int) -> bytes:
    w, h = SIZES[i % len(SIZES)]
    array = np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def caption(i: int) -> str:
    return f"a {['red', 'blue', 'green'][i % 3]} thing {i}"


def write_folder(root, n: int = 21, corrupt: tuple = ()):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "captions.jsonl", "w") as f:
        for i in range(n):
            (root / f"{i}.png").write_bytes(b"broken" if i in corrupt else image_bytes(i))
            f.write(json.dumps({"file": f"{i}.png", "caption": caption(i)}) + "\n")
    return root


def write_shards(root, n_shards: int = 4, per_shard: int = 6, corrupt: tuple = ()) -> str:
    """Shards of PNG images of mixed sizes with captions; returns the brace spec."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"train-{s:04d}.tar", "w") as tar:
            for j in range(per_shard):
                i = s * per_shard + j
                members = {"image.png": b"garbage" if i in corrupt else image_bytes(i), "txt": caption(i).encode()}
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(root / f"train-{{0000..{n_shards - 1:04d}}}.tar")
