"""The web app's host without the web: model discovery, request checks (messages for the page), sampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fusedit.cli import main as cli
from fusedit.serve.host import ModelHost, Request, RequestError, find_models, is_model_folder
from tests.diffusers_native.conftest import tiny_pipeline


@pytest.fixture(scope="module")
def host(tiny_llm_dir, demo_overrides, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "nested" / "tiny"
    tiny_pipeline(tiny_llm_dir, demo_overrides(tiny_llm_dir)).save_pretrained(folder)
    return ModelHost(device="cpu", max_images=3), str(folder)


def test_models_are_found_under_the_runs_folder(host):
    _, folder = host
    runs = str(folder).rsplit("/nested/", 1)[0]
    assert [str(p) for p in find_models(Path(runs))] == [folder]
    assert is_model_folder(Path(folder))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"prompt": "  "}, "Write a prompt"),
        ({"steps": 0}, "Steps must be at least 1 (got 0)"),
        ({"steps": 2.5}, "Steps must be a whole number"),
        ({"guidance_scale": -1}, "CFG scale must be at least 1"),
        ({"guidance_scale": 0.5}, "CFG scale must be at least 1 (got 0.5)"),
        ({"guidance_scale": float("nan")}, "CFG scale must be a finite number"),
        ({"seed": None}, "Seed is missing"),
        ({"width": 18}, "Width must be a multiple of 4 between 4 and 64"),
        ({"height": 68}, "Height must be a multiple of 4 between 4 and 64"),
        ({"num_images": 4}, "Number of images must be between 1 and 3"),
    ],
)
def test_bad_requests_are_refused_with_a_message_and_the_host_goes_on(host, change, message):
    model_host, folder = host
    with pytest.raises(RequestError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_host.generate(folder, Request(**{"prompt": "a red circle", **change}))
    images, seed = model_host.generate(folder, Request("a red circle", steps=1, width=8, height=8, seed=3))
    assert seed == 3 and images[0].size == (8, 8)


def test_seeds_steps_and_progress(host):
    model_host, folder = host
    steps_seen: list[tuple[int, int]] = []
    request = Request("two green triangles", steps=3, seed=5, width=24, height=16, num_images=2)
    first, _ = model_host.generate(folder, request, on_step=lambda done, total: steps_seen.append((done, total)))
    assert steps_seen == [(1, 3), (2, 3), (3, 3)] and [im.size for im in first] == [(24, 16)] * 2
    again, _ = model_host.generate(folder, request)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True))
    request.seed = 6
    other, _ = model_host.generate(folder, request)
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    request.randomize_seed = True
    _, random_seed = model_host.generate(folder, request)
    assert isinstance(random_seed, int) and 0 <= random_seed < 2**31


def test_serve_says_what_is_missing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/demo/fusedit here
    assert cli(["serve"]) == 2
    assert "runs/demo/fusedit is not a run, an exported pipeline or a reference folder (run `make demo` first)" in (
        capsys.readouterr().err
    )
    assert cli(["serve", str(tmp_path / "nope")]) == 2


def test_words_the_model_does_not_know_are_named(host):
    """The page's status line names them (the shapes world's tiny LLM knows only its world's words)."""
    from fusedit.serve.app import generate_fn

    model_host, folder = host
    assert model_host.unknown_words(folder, "two green triangles") == []
    assert model_host.unknown_words(folder, "a shiny green hexagon") == ["shiny", "hexagon"]
    _, _, status = generate_fn(model_host)(
        folder, "a shiny circle", "", 1, 1.0, 0, False, 8, 8, 1, progress=lambda *a, **k: None
    )
    assert status.startswith("#") and "does not know 'shiny'" in status
