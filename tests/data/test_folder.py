import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.data.errors import NoUsableDataError
from fusedit.data.folder import ImageFolderDataset, read_captions


def make_folder(root, n=5, bad=(), fmt="jsonl", keys=("file", "caption"), size=(24, 16)):
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir(exist_ok=True)
    rows = []
    for i in range(n):
        name = f"sub/img{i}.png" if i % 2 else f"img{i}.jpg"
        if i in bad:
            (root / name).write_bytes(b"garbage, not an image")
        else:
            Image.new("RGB", size, (i * 40 % 256, 100, 200)).save(root / name)
        rows.append((name, f"caption {i}"))
    if fmt == "jsonl":
        with open(root / "captions.jsonl", "w") as f:
            for name, cap in rows:
                f.write(json.dumps({keys[0]: name, keys[1]: cap}) + "\n")
            f.write("\n")  # blank lines are ignored
    else:
        with open(root / "captions.csv", "w") as f:
            f.write(f"{keys[0]},{keys[1]}\n")
            for name, cap in rows:
                f.write(f'{name},"{cap}, with a comma"\n')
    return rows


def red_of(i):
    return (i * 40 % 256) / 255 * 2 - 1


def test_jsonl_items(tmp_path):
    make_folder(tmp_path, n=4)
    ds = ImageFolderDataset(tmp_path, resolution=8)
    assert len(ds) == 4
    item = ds[3]
    assert item["caption"] == "caption 3"
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert item["image"][0, 0, 0].item() == pytest.approx(red_of(3), abs=1e-6)
    assert ds.skipped == 0 and ds.bad_files == []


@pytest.mark.parametrize("keys", [("file", "caption"), ("image", "text")])
def test_csv_and_alternative_keys(tmp_path, keys):
    make_folder(tmp_path, n=3, fmt="csv", keys=keys)
    ds = ImageFolderDataset(tmp_path, resolution=8)
    assert ds[1]["caption"] == "caption 1, with a comma"


def test_alternative_jsonl_keys(tmp_path):
    make_folder(tmp_path, n=2, keys=("image", "text"))
    assert read_captions(tmp_path / "captions.jsonl") == [("img0.jpg", "caption 0"), ("sub/img1.png", "caption 1")]


def test_corrupt_images_are_substituted_and_counted(tmp_path, caplog):
    make_folder(tmp_path, n=6, bad=(1, 2, 5))
    ds = ImageFolderDataset(tmp_path, resolution=8)
    with caplog.at_level(logging.WARNING, logger="fusedit.data"):
        captions = [ds[i]["caption"] for i in range(6)]
    # bad 1, 2 -> next good 3; bad 5 wraps around to 0
    assert captions == ["caption 0", "caption 3", "caption 3", "caption 3", "caption 4", "caption 0"]
    assert ds.skipped == 3
    assert ds.bad_files == ["sub/img1.png", "img2.jpg", "sub/img5.png"]
    assert sum("unreadable" in r.message for r in caplog.records) == 3  # each bad file logged once
    assert ds[1]["caption"] == "caption 3" and ds.skipped == 3  # deterministic, not recounted


def test_missing_image_file_is_skipped(tmp_path):
    make_folder(tmp_path, n=3)
    (tmp_path / "img2.jpg").unlink()
    ds = ImageFolderDataset(tmp_path, resolution=8)
    assert ds[2]["caption"] == "caption 0" and ds.bad_files == ["img2.jpg"]


def test_prescan(tmp_path):
    make_folder(tmp_path, n=5, bad=(4,))
    ds = ImageFolderDataset(tmp_path, resolution=8, prescan=True)
    assert ds.skipped == 1 and ds.bad_files == ["img4.jpg"]


def test_all_bad_raises(tmp_path):
    make_folder(tmp_path, n=2, bad=(0, 1))
    ds = ImageFolderDataset(tmp_path, resolution=8)
    with pytest.raises(NoUsableDataError, match="no readable image in .*: all 2 image"):
        ds[0]


def test_skips_seen_across_dataloader_workers(tmp_path):
    make_folder(tmp_path, n=8, bad=(1, 6))
    ds = ImageFolderDataset(tmp_path, resolution=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    batches = list(loader)
    assert sum(len(b["caption"]) for b in batches) == 8
    assert ds.skipped == 2 and ds.bad_files == ["sub/img1.png", "img6.jpg"]


def test_random_crop_seeded_by_epoch_and_index(tmp_path):
    root = tmp_path
    root.mkdir(exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 255, (16, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "a.png")
    (root / "captions.jsonl").write_text(json.dumps({"file": "a.png", "caption": "x"}) + "\n")
    ds = ImageFolderDataset(root, resolution=16, center_crop=False, seed=3)
    a, b = ds[0]["image"], ds[0]["image"]
    assert torch.equal(a, b)
    crops = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        crops.add(ds[0]["image"].sum().item())
    assert len(crops) > 1


def test_user_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "nope", 8)
    tmp_path.mkdir(exist_ok=True)
    with pytest.raises(FileNotFoundError, match="no captions file"):
        ImageFolderDataset(tmp_path, 8)
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        ImageFolderDataset(tmp_path, 8, captions="other.jsonl")
    (tmp_path / "captions.csv").write_text("path,label\na.jpg,x\n")
    with pytest.raises(ValueError, match="columns 'file'.*'caption'.*got \\['path', 'label'\\]"):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "captions.jsonl").write_text('{"file": "a.jpg", "caption": "x"}\n{"file": "b.jpg"}\n')
    with pytest.raises(ValueError, match="captions.jsonl:2: needs keys"):
        ImageFolderDataset(tmp_path, 8)
    (tmp_path / "captions.jsonl").write_text('{"file": "a.jpg", "caption": "x"\n')
    with pytest.raises(ValueError, match="captions.jsonl:1: invalid JSON"):
        ImageFolderDataset(tmp_path, 8)


def test_on_bad_raise(tmp_path):
    from fusedit.data.transforms import CorruptImageError

    make_folder(tmp_path, n=3, bad=(1,))
    ds = ImageFolderDataset(tmp_path, resolution=8, on_bad="raise")
    assert ds[0]["caption"] == "caption 0"
    with pytest.raises(CorruptImageError):
        ds[1]
    with pytest.raises(CorruptImageError):
        ds[1]  # raises again, counted once
    assert ds.skipped == 1
    with pytest.raises(ValueError, match="on_bad"):
        ImageFolderDataset(tmp_path, 8, on_bad="ignore")


@pytest.mark.parametrize(
    "name,text,where",
    [
        ("captions.jsonl", b'{"file": "a.jpg", "caption": "ok"}\n{"file": "b.jpg", "caption": "caf\xe9"}\n', ":2:"),
        ("captions.csv", b"file,caption\na.jpg,ok\nb.jpg,ok\nc.jpg,caf\xe9 au lait\n", ":4:"),
    ],
)
def test_captions_that_are_not_utf8_name_the_file_and_line(tmp_path, name, text, where):
    """Issue 17, item 9: the error names the file, the line and the byte (it named neither file nor line)."""
    (tmp_path / name).write_bytes(text)
    with pytest.raises(ValueError) as caught:
        read_captions(tmp_path / name)
    assert str(caught.value).startswith(f"{tmp_path / name}{where} not UTF-8 text (byte 0xe9 at column ")
    assert "save the captions file as UTF-8" in str(caught.value)
    (tmp_path / name).write_bytes(text.replace(b"\xe9", "é".encode()))
    assert read_captions(tmp_path / name)[-1][1].startswith("café")
