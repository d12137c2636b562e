"""The Gradio page of ``fusedit serve``: prompt, negative prompt, steps, CFG, seed (or a random one), size within
what the model draws, number of images, and a model picker over the runs folder; per-step progress; one request at
a time through Gradio's queue (the others wait in line). A bad request shows its message in the page and the server
stays up. Scripts use the same endpoint through Gradio's API (``/generate``)::

    from gradio_client import Client
    images, seed, note = Client("http://127.0.0.1:7860/").predict(
        "runs/demo/fusedit", "a red circle", "", 20, 4.0, 0, False, 32, 32, 1, api_name="/generate")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gradio as gr

from fusedit.serve.host import ModelHost, Request, RequestError

#: The element ids the browser test and scripts rely on.
IDS = ("model", "prompt", "negative-prompt", "steps", "cfg", "seed", "randomize", "width", "height", "num-images")


def settings_for(host: ModelHost, path: str) -> list[Any]:
    """The page's controls for the model of ``path``: its default steps, CFG and negative prompt, and the sizes it
    draws."""
    try:
        limits = host.limits(path)
    except Exception as error:  # a model that does not load is reported in the page, not raised
        raise gr.Error(f"Could not load {path}: {error}") from None
    size: dict[str, Any] = {
        "minimum": limits.multiple,
        "maximum": limits.largest,
        "step": limits.multiple,
        "value": limits.default,
    }
    return [
        gr.update(value=limits.steps),
        gr.update(value=limits.guidance_scale),
        gr.update(value=limits.negative_prompt),
        gr.update(**size),
        gr.update(**size),
        f"{path}: sides are multiples of {limits.multiple} px up to {limits.largest} px.",
    ]


def generate_fn(host: ModelHost):
    """The handler of the Generate button (and of the ``/generate`` API)."""

    def generate(
        model: str,
        prompt: str,
        negative_prompt: str,
        steps: Any,
        guidance_scale: Any,
        seed: Any,
        randomize_seed: bool,
        width: Any,
        height: Any,
        num_images: Any,
        progress: gr.Progress = gr.Progress(),  # noqa: B008  (Gradio's way to ask for a progress tracker)
    ) -> tuple[list[tuple[Any, str]], int, str]:
        request = Request(
            prompt, negative_prompt, steps, guidance_scale, seed, randomize_seed, width, height, num_images
        )
        progress(0, desc="loading the model")
        try:
            images, used = host.generate(model, request, on_step=lambda done, total: progress((done, total), "steps"))
        except RequestError as error:
            raise gr.Error(str(error)) from None
        captions = [(image, f"seed {used} · {image.width}×{image.height}") for image in images]
        status = f"#{host.answered}: {len(images)} image(s) of {width}×{height}, seed {used}."
        unknown = host.unknown_words(model, prompt)
        if unknown:
            them = "it" if len(unknown) == 1 else "them"
            status += f" The model does not know {', '.join(repr(w) for w in unknown)}: it saw no meaning in {them}."
        return captions, used, status

    return generate


def build_app(host: ModelHost, models: Sequence[str], default: str) -> gr.Blocks:
    """The page; ``models``: the choices of the model picker (paths), ``default`` the one shown first."""
    limits = host.limits(default)
    with gr.Blocks(title="fusedit") as app:
        gr.Markdown("# fusedit\nText to image with a diffusion transformer fused with a language model.")
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(list(models), value=default, label="Model", elem_id="model")
                prompt = gr.Textbox(
                    label="Prompt", lines=2, elem_id="prompt", placeholder="a red circle above a blue square"
                )
                negative = gr.Textbox(label="Negative prompt", value=limits.negative_prompt, elem_id="negative-prompt")
                with gr.Row():
                    steps = gr.Number(label="Steps", value=limits.steps, precision=0, elem_id="steps")
                    cfg = gr.Number(label="CFG scale", value=limits.guidance_scale, elem_id="cfg")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    randomize = gr.Checkbox(label="Random seed", value=False, elem_id="randomize")
                with gr.Row():
                    width = gr.Slider(
                        limits.multiple,
                        limits.largest,
                        limits.default,
                        step=limits.multiple,
                        label="Width",
                        elem_id="width",
                    )
                    height = gr.Slider(
                        limits.multiple,
                        limits.largest,
                        limits.default,
                        step=limits.multiple,
                        label="Height",
                        elem_id="height",
                    )
                count = gr.Slider(1, host.max_images, value=1, step=1, label="Images", elem_id="num-images")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                gallery = gr.Gallery(label="Images", columns=2, format="png", elem_id="gallery")
                status = gr.Markdown(elem_id="status")
        inputs = [model, prompt, negative, steps, cfg, seed, randomize, width, height, count]
        button.click(generate_fn(host), inputs, [gallery, seed, status], api_name="generate", concurrency_limit=1)
        model.change(lambda path: settings_for(host, path), model, [steps, cfg, negative, width, height, status])
    return app.queue(default_concurrency_limit=1, max_size=32)
