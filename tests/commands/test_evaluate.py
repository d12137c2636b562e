"""`fusedit eval`: the shapes suite end to end on a 2-step run of a tiny world, and the other suites' wiring/errors."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusedit.cli import main as cli_main
from fusedit.data.shapes import ShapesWorld
from fusedit.eval.images import sampled_pairs
from fusedit.experiment import load_experiment
from fusedit.text.tiny_llm import ensure_tiny_llm
from tests.conftest import TINY_LLM as CONFTEST_TINY_LLM

pytestmark = pytest.mark.slow

#: A shapes world with few held-out prompts (every category still present) and a tiny model.
WORLD = ["data.shapes.max_objects=2", "data.shapes.held_out_fraction=0.01", "data.shapes.size=64"]
TRAIN = [
    "train.max_steps=2",
    "train.batch_size=4",
    "train.warmup_steps=0",
    "train.sample_every=0",
    "train.checkpoint_every=2",
    "train.log_every=1",
]
#: the session's tiny LLM geometry with a wider MLP, a few training steps and shorter prompts
TINY_LLM = replace(CONFTEST_TINY_LLM, intermediate_size=64, steps=5, max_length=16)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from fusedit.train.launch import train_run

    root = tmp_path_factory.mktemp("eval_cli")
    base = load_experiment("demo", WORLD)
    world = ShapesWorld(base.data.shapes, base.data.resolution)
    llm = ensure_tiny_llm(root / "llm", world.caption_corpus(), TINY_LLM)
    config = load_experiment("demo", WORLD + TRAIN + [f"text.llm={llm}"])
    train_run(config, root / "run", progress=False)
    return root / "run"


def test_shapes_suite_writes_scores_and_grids(run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [
        "eval",
        str(run_dir),
        "--suite",
        "shapes",
        "--per-prompt",
        "2",
        "--seed",
        "5",
        "--steps",
        "2",
        "--cfg",
        "3.0",
        "--min-per-category",
        "0",
        "--allow-small",
        "--no-controls",
        "--out",
        str(out),
    ]
    assert cli_main(args) == 0
    assert "overall" in capsys.readouterr().out
    scores = json.loads((out / "scores.json").read_text())
    config = load_experiment(run_dir / "config.yaml")
    world = ShapesWorld(config.data.shapes, config.data.resolution)
    held_out = world.held_out_prompts()
    assert set(scores["accuracy"]) == set(world.categories)  # every category
    assert scores["num_images"] == 2 * len(held_out)
    assert 0.0 <= scores["overall"] <= 1.0 and scores["fd_pixels"] >= 0.0
    settings = scores["settings"]
    assert (settings["seed"], settings["per_prompt"], settings["num_inference_steps"], settings["guidance_scale"]) == (
        5,
        2,
        2,
        3.0,
    )
    assert settings["resolution"] == 32 and settings["shapes"]["held_out_fraction"] == 0.01
    # per-prompt results: the held-out prompts only (never training prompts), with their recorded seeds
    prompts = [p["prompt"] for p in scores["per_prompt"]]
    assert prompts == [s.text for s in held_out]
    assert not set(prompts) & {s.text for s in world.training_prompts()}
    assert scores["per_prompt"][1]["seeds"] == [7, 8]
    for category in world.categories:
        assert scores["correct"][category] == sum(
            sum(p["correct"]) for p in scores["per_prompt"] if p["category"] == category
        )
        grid = out / f"grid-{category}.png"
        assert grid.is_file() and Image.open(grid).size[0] > 32
        assert (out / f"grid-{category}.txt").read_text().startswith("row 0: ")

    manifest = scores["manifest"]
    assert (manifest["steps"], manifest["cfg"], manifest["seed"], manifest["resolution"]) == (2, 3.0, 5, 32)
    assert manifest["sampler"] == "FlowMatchEulerDiscreteScheduler" and manifest["shift"] == config.sample.shift
    assert len(manifest["config_hash"]) == len(manifest["checkpoint_hash"]) == 64
    assert manifest["images_per_category"] == scores["total"]

    # the recorded seeds reproduce the images: a second evaluation gives identical results
    again = tmp_path / "again"
    assert cli_main(args[:-1] + [str(again)]) == 0
    repeated = json.loads((again / "scores.json").read_text())
    assert repeated["per_prompt"] == scores["per_prompt"]
    assert repeated["manifest"]["checkpoint_hash"] == manifest["checkpoint_hash"]
    # without --allow-small, the few images of this tiny world are refused with a clear message
    refused = [a for a in args if a != "--allow-small"][:-1] + [str(tmp_path / "refused")]
    assert cli_main(refused) == 2
    assert "--allow-small" in capsys.readouterr().err


def test_run_evaluation_carries_its_controls(run_dir, tmp_path, capsys):
    summary = tmp_path / "summary.json"
    args = ["eval", str(run_dir), "--suite", "shapes", "--per-prompt", "1", "--steps", "1", "--min-per-category", "0"]
    assert cli_main(args + ["--allow-small", "--out", str(tmp_path / "e"), "--json", str(summary)]) == 0
    document = json.loads(summary.read_text())
    assert document["controls"]["ground_truth"] >= 0.97 and document["controls"]["one_more"] <= 0.03
    assert document["overall"] <= document["controls"]["ground_truth"]
    assert "best garbage" in capsys.readouterr().out


def test_geneval_suite_samples_the_official_layout(run_dir, tmp_path):
    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text(
        json.dumps({"tag": "single_object", "prompt": "a circle"})
        + "\n"
        + json.dumps({"tag": "colors", "prompt": "a red square"})
        + "\n"
    )
    out = tmp_path / "geneval"
    assert (
        cli_main(
            [
                "eval",
                str(run_dir),
                "--suite",
                "geneval",
                "--metadata",
                str(metadata),
                "--per-prompt",
                "2",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (out / "00001" / "samples").iterdir()) == ["0000.png", "0001.png"]
    assert json.loads((out / "sampling.json").read_text())["settings"]["num_inference_steps"] == 2
    pairs = sampled_pairs(out)  # what --suite clip scores
    assert len(pairs) == 4 and pairs[-1][1] == "a red square"


def test_shapes_suite_needs_a_shapes_run(tmp_path, capsys):
    assert cli_main(["eval", str(tmp_path), "--suite", "shapes"]) == 2
    assert "neither a training run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--suite", "geneval", "PATH"], "needs --metadata"),
        (["--suite", "dpgbench", "PATH"], "needs --prompts"),
        (["--suite", "fid", "--real", "r"], "needs --fake and --inception-weights"),
        (["--suite", "clip", "PATH"], "needs --clip-model"),
        (["--suite", "shapes"], "needs PATH"),
    ],
)
def test_missing_arguments_are_reported(args, message, tmp_path, capsys):
    args = [str(tmp_path) if a == "PATH" else a for a in args]
    assert cli_main(["eval"] + args) == 2
    assert message in capsys.readouterr().err


def test_fid_suite_with_missing_weights(tmp_path, capsys):
    for name in ("real", "fake"):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / name / f"{i}.png")
    assert (
        cli_main(
            [
                "eval",
                "--suite",
                "fid",
                "--real",
                str(tmp_path / "real"),
                "--fake",
                str(tmp_path / "fake"),
                "--inception-weights",
                str(tmp_path / "missing.pth"),
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_clip_pairs_need_prompts(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="has no prompt"):
        sampled_pairs(tmp_path)
    (tmp_path / "a.txt").write_text("a red circle\n")
    assert sampled_pairs(tmp_path) == [(tmp_path / "a.png", "a red circle")]


class PerfectPipe:
    """Stands in for a model that draws every prompt right: it renders the prompt with the shapes world, seeded by
    the image's generator (so recorded seeds reproduce images)."""

    device = "cpu"
    defaults = None

    def __init__(self, world: ShapesWorld):
        self.world = world
        self.calls: list[list[str]] = []

    def __call__(self, prompts, *, generator, height, width, output_type, **kwargs):
        import numpy as np
        import torch

        from fusedit.sampling.pipeline import PipelineOutput

        assert output_type == "pt" and height == width == self.world.resolution and len(generator) == len(prompts)
        self.calls.append(list(prompts))
        images = [
            self.world.render(self.world.spec(p), np.random.default_rng(g.initial_seed()))
            for p, g in zip(prompts, generator, strict=True)
        ]
        return PipelineOutput(images=torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255)


def small_settings(**changes):
    """Shapes-suite settings for a stand-in pipeline on the tiny world: one image per prompt, one step, no CFG, at
    least 4 images per category, no controls."""
    from fusedit.eval.shapes_eval import ShapesEvalSettings

    defaults = dict(per_prompt=1, seed=3, num_inference_steps=1, guidance_scale=1.0, min_per_category=4)
    return ShapesEvalSettings(**{**defaults, "allow_small": True, "controls": False, **changes})


def test_shapes_suite_scores_a_perfect_model_near_one(tmp_path):
    from fusedit.eval.shapes_eval import evaluate_shapes, format_scores, images_per_prompt

    config = load_experiment("demo", WORLD)
    world = ShapesWorld(config.data.shapes, config.data.resolution)
    pipe = PerfectPipe(world)
    settings = small_settings(batch_size=16)
    scores = evaluate_shapes(pipe, world, tmp_path, settings)
    assert scores["overall"] == 1.0 and scores["background_error"] == 0.0
    assert scores["color_recall"] == 1.0 and scores["color_precision"] == 1.0
    saved = np.load(tmp_path / "images.npz")
    assert (
        saved["images"].shape == (scores["num_images"], 32, 32, 3)
        and saved["prompts"][0] == scores["per_prompt"][0]["prompt"]
    )
    # a model drawing the right objects in wrong colors fails the color-bound categories
    recolor = PerfectPipe(world)
    recolor.world = _Recolored(world)
    wrong = evaluate_shapes(recolor, world, tmp_path / "wrong", settings)
    assert wrong["accuracy"]["colors"] < 0.5 and wrong["accuracy"]["single_object"] == 1.0
    # and the scores say why: each wrong image is a right shape in a wrong color
    assert all(reasons == {} for reasons in scores["failures"].values())
    assert set(wrong["failures"]["colors"]) == {"color"} and wrong["failures"]["single_object"] == {}
    assert sum(wrong["failures"]["colors"].values()) == wrong["total"]["colors"] - wrong["correct"]["colors"]
    assert "colors" in format_scores(wrong) and "wrong: color " in format_scores(wrong)
    assert wrong["color_recall"] < 0.7 and wrong["color_precision"] < 0.7
    # pixel FD: empty images are far from the real ones
    blank = PerfectPipe(world)
    blank.world = _Recolored(world, blank=True)
    empty = evaluate_shapes(blank, world, tmp_path / "blank", settings)
    assert empty["overall"] == 0.0 and empty["fd_pixels"] > 1.5 * scores["fd_pixels"]
    # categories with few held-out prompts get more images per prompt; seeds keep a fixed stride per prompt
    counts = images_per_prompt(world.held_out_prompts(), 1, 4)
    assert min(scores["total"].values()) >= 4 and scores["num_images"] == sum(counts)
    stride = scores["settings"]["seed_stride"]
    assert stride == max(counts) > 1
    assert scores["per_prompt"][2]["seeds"][0] == 3 + 2 * stride
    assert all(len(batch) <= 16 for batch in pipe.calls)
    assert set(scores["grids"]) == set(world.categories)


class _Recolored:
    """A shapes world whose renders swap red and green and turn blue objects yellow, or are empty (bad fake models)."""

    def __init__(self, world: ShapesWorld, blank: bool = False):
        self.world, self.resolution, self.blank = world, world.resolution, blank

    def spec(self, text: str):
        return self.world.spec(text)

    def render(self, spec, rng):
        image = self.world.render(spec, rng).copy()
        if self.blank:
            image[:] = (16, 16, 20)
            return image
        red, green, blue = (
            (image == (230, 40, 40)).all(-1),
            (image == (40, 200, 60)).all(-1),
            (image == (40, 90, 240)).all(-1),
        )
        image[red], image[green], image[blue] = (40, 200, 60), (230, 40, 40), (240, 220, 40)
        return image


class _SeenOnly:
    """A shapes world whose renders are right for training prompts and empty for held-out ones: a model that
    memorised its training prompts and generalises to nothing."""

    def __init__(self, world: ShapesWorld):
        self.world, self.resolution = world, world.resolution
        self.seen = {s.text for s in world.training_prompts()}

    def spec(self, text: str):
        return self.world.spec(text)

    def render(self, spec, rng):
        image = self.world.render(spec, rng).copy()
        if spec.text not in self.seen:
            image[:] = (16, 16, 20)
        return image


def test_the_training_prompt_set_tells_memorising_from_generalising(tmp_path):
    from fusedit.eval.shapes_eval import ShapesEvalSettings, evaluate_shapes

    config = load_experiment("demo", WORLD)
    world = ShapesWorld(config.data.shapes, config.data.resolution)
    pipe = PerfectPipe(world)
    pipe.world = _SeenOnly(world)
    settings = small_settings(pixel_fd=False)
    held_out = evaluate_shapes(pipe, world, tmp_path / "held-out", settings)
    seen = evaluate_shapes(pipe, world, tmp_path / "training", replace(settings, prompt_set="training"))
    assert held_out["overall"] == 0.0 and seen["overall"] == 1.0
    assert [p["prompt"] for p in seen["per_prompt"]] == [s.text for s in world.training_prompts()]
    assert seen["manifest"]["prompts"] == seen["settings"]["prompts"] == "training"
    assert held_out["manifest"]["prompts"] == held_out["settings"]["prompts"] == "held_out"
    with pytest.raises(ValueError, match="prompt set must be one of held_out, training"):
        ShapesEvalSettings(prompt_set="seen").validate()


def test_the_training_prompt_set_from_the_command_line(run_dir, tmp_path, capsys):
    args = ["eval", str(run_dir), "--suite", "shapes", "--per-prompt", "1", "--steps", "1", "--min-per-category", "0"]
    assert cli_main(args + ["--allow-small", "--no-controls", "--no-pixel-fd", "--prompt-set", "training"]) == 0
    scores = json.loads((run_dir / "eval-shapes-training" / "scores.json").read_text())
    config = load_experiment(run_dir / "config.yaml")
    world = ShapesWorld(config.data.shapes, config.data.resolution)
    assert scores["num_images"] == len(world.training_prompts()) and scores["manifest"]["prompts"] == "training"
    assert "training prompts" in capsys.readouterr().out
    assert cli_main(args + ["--prompt-set", "training", "--images", str(tmp_path)]) == 2
    assert "leave --prompt-set out" in capsys.readouterr().err


def test_controls_scored_beside_sampling_are_the_ones_scored_after_it(tmp_path):
    """``controls_in_background`` (the demo's setting) must give the same document as scoring the controls inline."""
    from fusedit.eval.shapes_eval import evaluate_shapes

    config = load_experiment("demo", WORLD)
    world = ShapesWorld(config.data.shapes, config.data.resolution)
    settings = small_settings(controls=True, pixel_fd=False)
    inline = evaluate_shapes(PerfectPipe(world), world, tmp_path / "inline", settings)
    beside = evaluate_shapes(
        PerfectPipe(world), world, tmp_path / "beside", replace(settings, controls_in_background=True)
    )
    assert beside["controls"]["ground_truth"] == 1.0 and beside["controls"]["blobs"] < 0.1
    # compared as JSON text: controls without background pixels have background error NaN, which != itself
    as_text = lambda document: json.dumps({k: v for k, v in document.items() if k != "manifest"}, sort_keys=True)  # noqa: E731
    assert as_text(beside) == as_text(inline)
