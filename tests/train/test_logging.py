import json

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.train.logging import TrainLogger, image_grid, read_metrics, save_image_grid, truncate_metrics


def test_image_grid_layout_and_values(tmp_path):
    images = torch.stack([torch.full((3, 4, 5), -1.0), torch.full((3, 4, 5), 1.0), torch.zeros(3, 4, 5)])
    path = save_image_grid(images, tmp_path / "g" / "grid.png", nrow=2)
    grid = np.asarray(Image.open(path))
    assert grid.shape == (2 * 4 + 3 * 2, 2 * 5 + 3 * 2, 3)
    assert (grid[2:6, 2:7] == 0).all() and (grid[2:6, 9:14] == 255).all() and (grid[8:12, 2:7] == 128).all()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        image_grid(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="NaN"):
        image_grid(torch.full((1, 3, 2, 2), float("nan")))


def test_metrics_jsonl_and_truncation_on_resume(tmp_path):
    log = TrainLogger(tmp_path, max_steps=10, progress=False, tensorboard=False)
    for step in (1, 2, 3):
        log.log(step, {"loss": 1.0 / step, "lr": 1e-4, "grad_norm": 0.5, "img_per_s": 10.0})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a crash mid-line
    assert truncate_metrics(tmp_path, 2) == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    log = TrainLogger(tmp_path, max_steps=10, initial_step=2, progress=False, tensorboard=False)
    log.log(3, {"loss": 0.1})
    log.close()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3] and records[0]["loss"] == 1.0
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1]) == {"step": 3, "loss": 0.1}
