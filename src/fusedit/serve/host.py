"""What the web app serves, without the web: the models under a runs folder, one loaded pipeline at a time, and a
request checked and sampled.

A request's mistakes (an empty prompt, 0 steps, a size the model cannot draw) raise :class:`RequestError` with a
message for the page; the host stays usable after any of them.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusedit.diffusers_native.convert import is_diffusers_folder
from fusedit.reference.importer import is_reference_folder
from fusedit.sampling.loading import EXPORT_MARKER, load_pipeline
from fusedit.text.encoder import unknown_words

#: Highest seed offered by "randomize" (torch generators take any 64-bit seed; this keeps it readable).
MAX_SEED = 2**31 - 1


class RequestError(ValueError):
    """A request the model cannot run; the message says what to change."""


def is_model_folder(path: Path) -> bool:
    """Whether :func:`fusedit.load_pipeline` reads ``path``: a training run, an export (either format) or a reference
    folder."""
    if not path.is_dir():
        return False
    if is_diffusers_folder(path) or is_reference_folder(path):
        return True
    index = path / "model_index.json"
    if index.is_file():
        try:
            return EXPORT_MARKER in json.loads(index.read_text())
        except json.JSONDecodeError:
            return False
    return (path / "config.yaml").is_file() and ((path / "final").is_dir() or (path / "checkpoints").is_dir())


def find_models(runs_dir: Path, max_depth: int = 3) -> list[Path]:
    """The model folders under ``runs_dir`` (a folder that is a model is not searched further), sorted."""
    found: list[Path] = []

    def visit(folder: Path, depth: int) -> None:
        if is_model_folder(folder):
            found.append(folder)
            return
        if depth >= max_depth:
            return
        for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            visit(child, depth + 1)

    if runs_dir.is_dir():
        visit(runs_dir, 0)
    return sorted(found)


@dataclass(frozen=True)
class Limits:
    """What a model draws: sides are multiples of ``multiple`` up to ``largest``; ``default`` is its own size."""

    multiple: int
    largest: int
    default: int
    steps: int
    guidance_scale: float
    negative_prompt: str


@dataclass
class Request:
    """One page request (values as the page sends them; checked by :meth:`ModelHost.check`)."""

    prompt: str
    negative_prompt: str = ""
    steps: Any = 20
    guidance_scale: Any = 4.0
    seed: Any = 0
    randomize_seed: bool = False
    width: Any = 32
    height: Any = 32
    num_images: Any = 1


class ModelHost:
    """Loads the model a request names (keeping the last one) and samples it; calls are serialised by a lock."""

    def __init__(self, device: str | None = None, max_images: int = 4) -> None:
        self.device, self.max_images = device, max_images
        self._loaded: tuple[str, Any] | None = None
        self._lock = threading.Lock()
        #: requests answered with images so far (the page numbers its answers with it)
        self.answered = 0

    def pipeline(self, path: str) -> Any:
        """The pipeline of ``path`` (loaded on first use; the previous model is released)."""
        if self._loaded is None or self._loaded[0] != path:
            self._loaded = None
            self._loaded = (path, load_pipeline(path, device=self.device))
        return self._loaded[1]

    def limits(self, path: str) -> Limits:
        pipe = self.pipeline(path)
        multiple, default = pipe.patch_multiple, pipe.default_size
        config = pipe.model.model_config
        largest = config.pos_embed_max_size * multiple if config.uses_sincos_table else 2 * default
        d = pipe.defaults
        return Limits(multiple, largest, default, d.num_inference_steps, d.guidance_scale, d.negative_prompt)

    def unknown_words(self, path: str, prompt: str) -> list[str]:
        """Words of ``prompt`` the model's tokenizer reads as its unknown token (the model sees no meaning in them)."""
        pipe = self.pipeline(path)
        tokenizer = getattr(pipe, "tokenizer", None)  # a diffusers pipeline's; ours sits on its text encoder
        if tokenizer is None:
            tokenizer = getattr(pipe.text_encoder, "tokenizer", None)
        return unknown_words(tokenizer, [prompt]) if tokenizer is not None else []

    def check(self, path: str, request: Request) -> tuple[int, float, int, int, int, int]:
        """``(steps, guidance_scale, seed, width, height, num_images)`` of a request, or :class:`RequestError`."""
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise RequestError("Write a prompt: describe the image to generate.")
        steps = whole_number(request.steps, "Steps")
        if steps < 1:
            raise RequestError(f"Steps must be at least 1 (got {steps}).")
        cfg = number(request.guidance_scale, "CFG scale")
        if cfg < 1:
            raise RequestError(f"CFG scale must be at least 1 (got {cfg}); 1 samples without guidance.")
        seed = random.randint(0, MAX_SEED) if request.randomize_seed else whole_number(request.seed, "Seed")
        if not 0 <= seed < 2**63:
            raise RequestError(f"Seed must be between 0 and 2^63 - 1 (got {seed}).")
        limits = self.limits(path)
        width, height = whole_number(request.width, "Width"), whole_number(request.height, "Height")
        for name, side in (("Width", width), ("Height", height)):
            if side < limits.multiple or side > limits.largest or side % limits.multiple:
                raise RequestError(
                    f"{name} must be a multiple of {limits.multiple} between {limits.multiple} and {limits.largest} "
                    f"for this model (got {side})."
                )
        count = whole_number(request.num_images, "Number of images")
        if not 1 <= count <= self.max_images:
            raise RequestError(f"Number of images must be between 1 and {self.max_images} (got {count}).")
        return steps, cfg, seed, width, height, count

    def generate(
        self, path: str, request: Request, on_step: Callable[[int, int], None] | None = None
    ) -> tuple[list[Any], int]:
        """Sample ``request`` with the model of ``path``: ``(PIL images, the seed used)``. ``on_step(done, total)``
        reports each finished step."""
        with self._lock:
            steps, cfg, seed, width, height, count = self.check(path, request)
            pipe = self.pipeline(path)

            def step_end(_pipe: Any, i: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
                if on_step is not None:
                    on_step(i + 1, steps)
                return {}

            try:
                out = pipe(
                    request.prompt,
                    negative_prompt=request.negative_prompt or "",
                    num_inference_steps=steps,
                    guidance_scale=cfg,
                    width=width,
                    height=height,
                    num_images_per_prompt=count,
                    generator=torch.Generator(device=pipe.device).manual_seed(seed),
                    callback_on_step_end=step_end,
                )
            except (ValueError, TypeError) as error:  # the pipeline's own checks (prompt length, sizes...)
                raise RequestError(str(error)) from None
            self.answered += 1
            return list(out.images), seed


def whole_number(value: Any, name: str) -> int:
    number_ = number(value, name)
    if number_ != int(number_):
        raise RequestError(f"{name} must be a whole number (got {value}).")
    return int(number_)


def number(value: Any, name: str) -> float:
    if isinstance(value, bool) or value is None or value == "":
        raise RequestError(f"{name} is missing: enter a number.")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{name} must be a number (got {value!r}).") from None
    if result != result or result in (float("inf"), float("-inf")):
        raise RequestError(f"{name} must be a finite number (got {value}).")
    return result
