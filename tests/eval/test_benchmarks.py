"""Benchmark samplers: GenEval / DPG-Bench / prompt-folder layouts, seeds, resume, and user errors."""

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fusedit.eval.benchmarks import (
    load_dpgbench_prompts,
    load_geneval_metadata,
    load_mjhq_prompts,
    sample_dpgbench,
    sample_geneval,
    sample_prompts_to_folder,
)


class FakePipe:
    """diffusers-style pipeline: each image is noise drawn from its own generator, tinted by its prompt."""

    def __init__(self, size=None):
        self.calls = []
        self.size = size

    def __call__(
        self,
        prompt,
        negative_prompt=None,
        height=512,
        width=512,
        num_inference_steps=25,
        guidance_scale=6.0,
        generator=None,
        latents=None,
        output_type="pil",
        max_sequence_length=256,
    ):
        self.calls.append(
            dict(
                prompt=prompt,
                negative_prompt=negative_prompt,
                height=height,
                width=width,
                steps=num_inference_steps,
                cfg=guidance_scale,
                generator=generator,
                output_type=output_type,
                max_sequence_length=max_sequence_length,
            )
        )
        assert isinstance(prompt, list) and len(generator) == len(prompt) and output_type == "pil"
        h, w = self.size or (height, width)
        return SimpleNamespace(images=[fake_image(p, g, h, w) for p, g in zip(prompt, generator, strict=True)])


def fake_image(prompt, generator, height, width):
    noise = torch.rand(height, width, 3, generator=generator)
    tint = (sum(map(ord, prompt)) % 97) / 97
    return Image.fromarray(((0.5 * noise + 0.5 * tint) * 255).to(torch.uint8).numpy())


def expected_image(prompt, seed, height, width):
    return np.asarray(fake_image(prompt, torch.Generator().manual_seed(seed), height, width))


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


GENEVAL = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
    {"tag": "counting", "include": [{"class": "dog", "count": 2}], "prompt": "a photo of two dogs"},
]


@pytest.fixture
def geneval_metadata(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(entry) + "\n" for entry in GENEVAL))
    return path


def test_geneval_layout_seeds_and_call(tmp_path, geneval_metadata):
    pipe = FakePipe()
    out = tmp_path / "geneval"
    summary = sample_geneval(
        pipe,
        geneval_metadata,
        out,
        n_samples=3,
        seed=7,
        num_inference_steps=5,
        guidance_scale=4.5,
        height=16,
        width=24,
        batch_size=4,
        save_grid=True,
    )
    assert (summary.generated, summary.skipped) == (9, 0)
    assert [len(c["prompt"]) for c in pipe.calls] == [4, 4, 1]  # batches mix prompts
    call = pipe.calls[0]
    assert call["negative_prompt"] == [""] * 4 and (call["height"], call["width"]) == (16, 24)
    assert (call["steps"], call["cfg"], call["max_sequence_length"]) == (5, 4.5, 256)  # not passed -> default
    record = json.loads((out / "sampling.json").read_text())
    assert record["settings"]["seed"] == 7 and record["settings"]["n_samples"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["00000", "00001", "00002", "sampling.json"]
    for i, entry in enumerate(GENEVAL):
        folder = out / f"{i:05d}"
        with open(folder / "metadata.jsonl") as fp:  # GenEval's scorer: json.load on this file
            assert json.load(fp) == entry
        names = sorted(p.name for p in (folder / "samples").iterdir())
        assert names == ["0000.png", "0001.png", "0002.png"]
        assert all(re.match(r"\d+\.png", n) for n in names)
        for k in range(3):
            assert record["seeds"][f"{i:05d}"][k] == 7 + 3 * i + k
            np.testing.assert_array_equal(
                pixels(folder / "samples" / f"{k:04d}.png"), expected_image(entry["prompt"], 7 + 3 * i + k, 16, 24)
            )
        assert Image.open(folder / "grid.png").size == (3 * 24, 16)
    assert not list(out.rglob(".*.tmp"))


def test_geneval_resumes_only_missing_samples(tmp_path, geneval_metadata):
    out = tmp_path / "g"
    kwargs = dict(n_samples=2, seed=0, height=8, width=8, batch_size=8)
    sample_geneval(FakePipe(), geneval_metadata, out, **kwargs)
    before = pixels(out / "00001" / "samples" / "0001.png")
    (out / "00001" / "samples" / "0001.png").unlink()
    pipe = FakePipe()
    summary = sample_geneval(pipe, geneval_metadata, out, **kwargs)
    assert (summary.generated, summary.skipped) == (1, 2)
    assert pipe.calls[0]["prompt"] == ["a photo of a red cat"]
    np.testing.assert_array_equal(pixels(out / "00001" / "samples" / "0001.png"), before)
    with pytest.raises(ValueError, match="other settings"):
        sample_geneval(FakePipe(), geneval_metadata, out, **{**kwargs, "seed": 1})


def test_geneval_metadata_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_geneval_metadata(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "tag": "x"}\n{not json\n')
    with pytest.raises(ValueError, match="line 2"):
        load_geneval_metadata(bad)
    bad.write_text('{"prompt": "a"}\n')
    with pytest.raises(ValueError, match="'tag'"):
        load_geneval_metadata(bad)


def test_pipeline_output_is_checked(tmp_path, geneval_metadata):
    with pytest.raises(RuntimeError, match="size"):
        sample_geneval(FakePipe(size=(8, 9)), geneval_metadata, tmp_path / "o", n_samples=1, height=8, width=8)


@pytest.fixture
def dpg_prompts(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "partiprompts7.txt").write_text("A red bicycle leans on a wall.\n")
    (folder / "coco12.txt").write_text("Two dogs play in the snow.")
    (folder / "README.md").write_text("ignored")
    return folder


def test_dpgbench_grids_match_scorer_crops(tmp_path, dpg_prompts):
    out = tmp_path / "dpg"
    pipe = FakePipe()
    summary = sample_dpgbench(pipe, dpg_prompts, out, seed=3, height=12, width=12, batch_size=3)
    assert (summary.generated, summary.skipped) == (8, 0)
    assert load_dpgbench_prompts(dpg_prompts) == [
        ("coco12", "Two dogs play in the snow."),
        ("partiprompts7", "A red bicycle leans on a wall."),
    ]
    record = json.loads((out / "sampling.json").read_text())
    r = 12
    crops = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]  # compute_dpg_bench.py
    for i, (name, prompt) in enumerate(load_dpgbench_prompts(dpg_prompts)):
        with Image.open(out / f"{name}.png") as grid:
            assert grid.size == (2 * r, 2 * r)
            for k, box in enumerate(crops):
                seed = record["seeds"][name][k]
                assert seed == 3 + 4 * i + k
                np.testing.assert_array_equal(
                    np.asarray(grid.crop(box).convert("RGB")), expected_image(prompt, seed, r, r)
                )
    (out / "coco12.png").unlink()
    pipe = FakePipe()
    summary = sample_dpgbench(pipe, dpg_prompts, out, seed=3, height=12, width=12, batch_size=3)
    assert (summary.generated, summary.skipped) == (4, 1)
    assert {p for c in pipe.calls for p in c["prompt"]} == {"Two dogs play in the snow."}


def test_dpgbench_user_errors(tmp_path, dpg_prompts):
    with pytest.raises(ValueError, match="height must equal width"):
        sample_dpgbench(FakePipe(), dpg_prompts, tmp_path / "o", height=8, width=16)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dpgbench_prompts(tmp_path / "nope")
    (dpg_prompts / "v1.2.txt").write_text("dotted")
    with pytest.raises(ValueError, match="dots"):
        load_dpgbench_prompts(dpg_prompts)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        load_dpgbench_prompts(empty)


def test_mjhq_prompts_to_category_folders(tmp_path):
    meta = tmp_path / "meta_data.json"
    meta.write_text(
        json.dumps(
            {
                "abc123": {"category": "people", "prompt": "a portrait"},
                "def456": {"category": "animals", "prompt": "a fox"},
                "ghi789": {"category": "people", "prompt": "a crowd"},
            }
        )
    )
    pairs = load_mjhq_prompts(meta)
    assert pairs == [("people/abc123", "a portrait"), ("animals/def456", "a fox"), ("people/ghi789", "a crowd")]
    assert load_mjhq_prompts(meta, categories=["people"], limit=1) == [("people/abc123", "a portrait")]
    with pytest.raises(ValueError, match="plants"):
        load_mjhq_prompts(meta, categories=["plants"])
    out = tmp_path / "mjhq"
    summary = sample_prompts_to_folder(
        FakePipe(), pairs, out, seed=5, height=8, width=8, batch_size=2, image_format="jpg"
    )
    assert (summary.generated, summary.skipped) == (3, 0)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg")) == [
        "animals/def456.jpg",
        "people/abc123.jpg",
        "people/ghi789.jpg",
    ]
    assert json.loads((out / "sampling.json").read_text())["seeds"]["animals/def456"] == 6
    summary = sample_prompts_to_folder(
        FakePipe(), pairs, out, seed=5, height=8, width=8, batch_size=2, image_format="jpg"
    )
    assert (summary.generated, summary.skipped) == (0, 3)


def test_prompt_folder_user_errors(tmp_path):
    for bad_id in ["../escape", "/abs", "a//b", ""]:
        with pytest.raises(ValueError, match="relative path"):
            sample_prompts_to_folder(FakePipe(), [(bad_id, "p")], tmp_path / "o")
    with pytest.raises(ValueError, match="unique"):
        sample_prompts_to_folder(FakePipe(), [("a", "p"), ("a", "q")], tmp_path / "o")
    with pytest.raises(ValueError, match="image_format"):
        sample_prompts_to_folder(FakePipe(), [("a", "p")], tmp_path / "o", image_format="gif")
    with pytest.raises(FileNotFoundError):
        load_mjhq_prompts(tmp_path / "missing.json")
