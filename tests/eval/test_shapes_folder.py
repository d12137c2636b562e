"""Scoring a folder of images in GenEval's layout, `--controls` alone, `--json`, and the refusal of small categories."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fusedit.cli import main as cli_main
from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import CATEGORIES, ShapesWorld, parse_prompt
from fusedit.eval.shapes_folder import evaluate_image_folder, read_sample_folder
from fusedit.eval.shapes_stats import bootstrap_ci, check_category_sizes, per_category, summarize


def _write_folder(root: Path, prompts_images: list[tuple[str, list[np.ndarray]]]) -> Path:
    for i, (prompt, images) in enumerate(prompts_images):
        folder = root / f"{i:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps({"prompt": prompt, "tag": "x"}) + "\n")
        for k, image in enumerate(images):
            Image.fromarray(image).save(folder / "samples" / f"{k:04d}.png")
    return root


def _renders(world, spec, n, rng):
    return [world.render(spec, rng) for _ in range(n)]


def test_any_prompt_of_the_grammar_parses():
    spec = parse_prompt("  A Red circle to the left of a blue square. ")
    assert (spec.category, spec.relation, [o.color for o in spec.objects]) == ("position", "left of", ["red", "blue"])
    assert parse_prompt("four white triangles").objects[0].count == 4
    with pytest.raises(ValueError, match="not a prompt of the shapes world"):
        parse_prompt("a photo of a cat")
    with pytest.raises(ValueError, match="not a prompt"):
        parse_prompt("five red circles")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """48 px ground-truth renders of training and held-out prompts of every category (3 prompts × 2 images each),
    and the same prompts with empty images."""
    world = ShapesWorld(ShapesWorldConfig(), 48)
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("geneval")
    chosen = [s for c in CATEGORIES for s in world.all_prompts(c)[:3]]
    good = _write_folder(root / "good", [(s.text, _renders(world, s, 2, rng)) for s in chosen])
    empty = _write_folder(root / "empty", [(s.text, [world.draw([])] * 2) for s in chosen])
    return good, empty, len(chosen) * 2


def test_folder_of_ground_truth_scores_one_and_empty_images_zero(folder):
    good, empty, n = folder
    result = evaluate_image_folder(good, controls=False, allow_small=True)
    assert result["overall"] == 1.0 and sum(v["n"] for v in result["categories"].values()) == n
    assert result["manifest"]["resolution"] == 48 and result["manifest"]["prompts"] == "folder"
    assert len(result["per_image"]) == n and all(r["correct"] for r in result["per_image"])
    assert evaluate_image_folder(empty, controls=False, allow_small=True)["overall"] == 0.0


def test_small_categories_are_refused_unless_allowed(folder):
    good, _, _ = folder
    with pytest.raises(ValueError, match="at least 50 images.*--allow-small"):
        evaluate_image_folder(good, controls=False)


def test_cli_scores_a_folder_and_writes_the_summary_json(folder, tmp_path, capsys):
    good, _, n = folder
    target = tmp_path / "summary.json"
    assert (
        cli_main(
            [
                "eval",
                "--suite",
                "shapes",
                "--images",
                str(good),
                "--allow-small",
                "--out",
                str(tmp_path / "o"),
                "--json",
                str(target),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "overall 1.000" in printed and "controls" in printed
    summary = json.loads(target.read_text())
    assert set(summary) >= {"overall", "ci95", "categories", "controls", "manifest"}
    assert summary["categories"]["position"]["n"] == 6 and len(summary["categories"]["position"]["ci95"]) == 2
    assert summary["controls"]["ground_truth"] >= 0.97 and summary["controls"]["blobs"] <= 0.03
    manifest = summary["manifest"]
    assert manifest["images_per_category"] == {c: 6 for c in CATEGORIES}
    assert len(manifest["prompt_set_hash"]) == 64 and "commit" in manifest and "dirty" in manifest


@pytest.mark.slow  # several seconds: subprocesses / the full control set
def test_cli_controls_alone(tmp_path, capsys):
    target = tmp_path / "controls.json"
    assert (
        cli_main(
            [
                "eval",
                "--suite",
                "shapes",
                "--controls",
                "--per-prompt",
                "1",
                "--min-per-category",
                "4",
                "--allow-small",
                "--out",
                str(tmp_path / "c"),
                "--json",
                str(target),
            ]
        )
        == 0
    )
    summary = json.loads(target.read_text())
    assert summary["controls_pass"] and summary["overall"] == summary["controls"]["ground_truth"]
    assert "controls all pass" in capsys.readouterr().out


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda root: (root / "00000" / "metadata.jsonl").write_text('{"prompt": "a photo of a cat"}\n'), "grammar"),
        (lambda root: (root / "00000" / "metadata.jsonl").write_text("not json\n"), "first line of JSON"),
        (lambda root: Image.new("RGB", (48, 32)).save(root / "00000" / "samples" / "0000.png"), "48x32"),
        (lambda root: (root / "00000" / "samples" / "0000.png").write_bytes(b"not a png"), "not a readable image"),
    ],
)
def test_bad_folders_get_one_clear_error(tmp_path, mutate, message, capsys):
    world = ShapesWorld(ShapesWorldConfig(), 48)
    root = _write_folder(
        tmp_path / "f", [("a red circle", _renders(world, parse_prompt("a red circle"), 1, np.random.default_rng(0)))]
    )
    mutate(root)
    with pytest.raises(ValueError, match=message):
        read_sample_folder(root)
    assert cli_main(["eval", "--suite", "shapes", "--images", str(root), "--allow-small"]) == 2
    assert message in capsys.readouterr().err


def test_folder_without_the_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="GenEval's layout"):
        read_sample_folder(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_sample_folder(tmp_path / "missing")


def test_bootstrap_intervals_cover_the_estimate_and_shrink_with_more_images():
    rng = np.random.default_rng(0)
    small = per_category(list(rng.random(60) < 0.5), ["position"] * 30 + ["colors"] * 30)
    large = per_category(list(rng.random(2000) < 0.5), ["position"] * 1000 + ["colors"] * 1000)
    (cats_small, overall_small), (_, overall_large) = bootstrap_ci(small), bootstrap_ci(large)
    summary = summarize([True] * 10 + [False] * 30, ["colors"] * 20 + ["position"] * 20)
    assert summary["overall"] == pytest.approx(0.25) and summary["categories"]["colors"]["accuracy"] == 0.5
    lo, hi = summary["ci95"]
    assert lo <= 0.25 <= hi and 0 < hi - lo < 0.5
    assert (overall_large[1] - overall_large[0]) < (overall_small[1] - overall_small[0]) / 3
    assert all(lo <= small[c].mean() <= hi for c, (lo, hi) in cats_small.items())
    assert summarize([True] * 4, ["colors"] * 4)["ci95"] == [1.0, 1.0]
    check_category_sizes({"colors": 60}, allow_small=False)
    check_category_sizes({"colors": 3}, allow_small=True)
    with pytest.raises(ValueError, match=r"colors \(3\)"):
        check_category_sizes({"colors": 3, "position": 80}, allow_small=False)
