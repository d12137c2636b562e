"""Issue 17, items 8 and 9 in the Python API: bad arguments of ``pipe(...)`` raise ``TypeError``/``ValueError``
naming the argument before anything runs, for the diffusers pipeline and fusedit's own sampler, instead of a
default in place of the value given (``height=0``, ``num_inference_steps=0``), the unguided image for a CFG below 1,
or a raw TypeError from deep inside torch (``height=32.0``, ``prompt=None``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fusedit.sampling.pipeline import FuseDiTPipeline as Sampler

BAD = [
    ({"prompt": None}, ValueError, "prompt is None: pass a string or a non-empty list of strings"),
    ({"prompt": []}, ValueError, "prompt is an empty list"),
    ({"prompt": 5}, TypeError, "prompt is a int: pass a string or a list of strings"),
    ({"prompt": ["a red circle", None]}, TypeError, r"prompt\[1\] is a NoneType \(None\), expected a string"),
    ({"height": 32.0}, TypeError, r"height must be an integer, got 32.0 \(float\); e.g. height=32"),
    ({"width": "16"}, TypeError, r"width must be an integer, got '16' \(str\)"),
    ({"height": True}, TypeError, r"height must be an integer, got True \(bool\)"),
    ({"height": 0}, ValueError, "height must be a positive integer, got 0"),
    ({"width": -16}, ValueError, "width must be a positive integer, got -16"),
    ({"height": 18}, ValueError, r"height and width must be positive multiples of 4 \(patch size 4 × codec factor 1\)"),
    ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be a positive integer, got 0"),
    ({"num_inference_steps": 2.5}, TypeError, "num_inference_steps must be an integer, got 2.5"),
    ({"guidance_scale": 0.5}, ValueError, r"guidance_scale must be >= 1 \(1 = no guidance"),
    ({"guidance_scale": -5}, ValueError, r"guidance_scale must be >= 1 .*got -5"),
    ({"guidance_scale": math.nan}, ValueError, "guidance_scale must be a finite number, got nan"),
    ({"guidance_scale": "4"}, TypeError, r"guidance_scale must be a number, got '4' \(str\)"),
    ({"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt must be a positive integer, got 0"),
    ({"max_sequence_length": 0}, ValueError, "max_sequence_length must be a positive integer, got 0"),
]


@pytest.fixture
def nothing_runs(monkeypatch):
    """Fail the test if a call gets as far as the text encoder."""

    def refuse(*args, **kwargs):
        raise AssertionError("the pipeline ran before refusing its arguments")

    monkeypatch.setattr(Sampler, "text_conditioning", refuse)


def call(target, change: dict):
    kwargs = {"prompt": "a red circle", "num_inference_steps": 1, "output_type": "latent", **change}
    prompt = kwargs.pop("prompt")
    return target(prompt, **kwargs)


@pytest.mark.parametrize("change,error,message", BAD)
def test_the_diffusers_pipeline_refuses_bad_arguments(pipe, nothing_runs, change, error, message):
    with pytest.raises(error, match=message):
        call(pipe, change)


@pytest.mark.parametrize("change,error,message", BAD)
def test_fusedits_sampler_refuses_bad_arguments(pipe, nothing_runs, change, error, message):
    with pytest.raises(error, match=message):
        call(pipe._current_sampler(), change)


def test_numpy_integers_and_cfg_one_are_accepted(pipe):
    out = call(pipe, {"height": np.int64(16), "width": 8, "guidance_scale": 1, "num_images_per_prompt": 2})
    assert tuple(out.images.shape) == (2, 3, 16, 8)
