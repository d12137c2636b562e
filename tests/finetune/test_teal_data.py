"""``tools/teal_tutorial.py``'s pieces, fast: the tutorial's folder with its prior-preservation mix (counts, file
names, captions, pixels), and the ground-truth row and bootstrap intervals of its scores."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from fusedit.data.shapes import PALETTE, parse_prompt

from ..tool_loader import load_tool

teal_tutorial = load_tool("teal_tutorial")


def _has(image: np.ndarray, rgb: tuple[int, int, int]) -> bool:
    return bool((np.abs(image.astype(int) - rgb).sum(-1) == 0).any())


def test_the_folder_holds_the_teal_images_and_the_prior_mix(tmp_path):
    out = teal_tutorial.write_data(tmp_path / "teal", count=6, resolution=32, seed=0, prior=4)
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["file"] for r in rows] == [f"{i:05d}.png" for i in range(6)] + [f"prior-{i:05d}.png" for i in range(4)]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["file"] for r in rows)
    for row in rows:
        image = np.asarray(Image.open(out / row["file"]))
        teal = row["file"][0].isdigit()
        assert image.shape == (32, 32, 3)
        assert ("teal" in row["caption"].split()) == teal and _has(image, teal_tutorial.TEAL) == teal
        if not teal:  # the world's own caption, and every color it names is drawn
            spec = parse_prompt(row["caption"])
            assert all(_has(image, PALETTE[o.color]) for o in spec.objects if o.color is not None)
    again = teal_tutorial.write_data(tmp_path / "again", count=6, resolution=32, seed=0, prior=0)
    assert (again / "captions.jsonl").read_text().splitlines() == (out / "captions.jsonl").read_text().splitlines()[:6]


def test_the_ground_truth_draws_what_the_prompts_name():
    teal, control = teal_tutorial.prompts()
    real = teal_tutorial.real_images(teal, 2, 32, seed=0)
    controls = teal_tutorial.real_images([text for text, _ in control], 2, 32, seed=0)
    assert real.shape == (2 * len(teal), 32, 32, 3) and controls.shape == (2 * len(control), 32, 32, 3)
    row = teal_tutorial.rate(real, controls, per_prompt=2)
    assert row["teal_samples"] == 2 * len(teal) and row["control_samples"] == 2 * len(control)
    # every real teal image holds a teal object (the red one of "... left of a red ..." stays red), no control one
    assert (teal_tutorial.color_fraction(real, teal_tutorial.TEAL) > 0.02).all()
    assert all(_has(image, PALETTE["red"]) for image in real[2 * 3 :])
    assert row["control_prompts_teal_fraction"] == 0 and row["control_prompts_named_color_fraction"] > 0.02
    low, high = row["teal_prompts_teal_fraction_ci95"]
    assert low < row["teal_prompts_teal_fraction"] < high


def test_bootstrap_interval():
    values = np.random.default_rng(0).normal(0.5, 0.1, size=400)
    low, high = teal_tutorial.bootstrap_ci(values)
    assert low < values.mean() < high and 0.015 < high - low < 0.025  # ±1.96 · 0.1 / √400 ≈ ±0.0098
    assert teal_tutorial.bootstrap_ci(np.full(5, 0.25)) == (0.25, 0.25)
