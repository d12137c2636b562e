"""What a study's variant costs: FLOPs per image for training and sampling, counted on the trained model itself.

The count is :class:`torch.utils.flop_counter.FlopCounterMode` over real pipeline calls (every matmul and attention
product the model actually runs, for any fusion, attention or conditioning variant), not a formula:

* ``dit_forward``: FLOPs of one DiT forward for one image = (a 2-step call − a 1-step call), both without CFG;
* ``text_forward``: the LLM forward of one prompt = the 1-step call − one DiT forward;
* ``train_per_image``: 3 × ``dit_forward`` (forward + backward ≈ 2 × forward) + the LLM forward, or 3 × the LLM
  forward when the LLM trains too (a frozen LLM's contexts may also be cached per caption, which makes its share
  smaller still);
* ``sample_per_image``: a whole sampling call at the study's steps and CFG (the unconditional branch included).

Averaged over one held-out prompt per category (the text length changes the attention cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_flops(pipe: Any, prompt: str, steps: int, guidance_scale: float) -> int:
    """FLOPs of ``pipe(prompt, ...)`` generating one image."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt")
    return int(counter.get_total_flops())


def measure_costs(
    pipe: Any, prompts: Sequence[str], steps: int, guidance_scale: float, text_trainable: bool = False
) -> dict[str, float]:
    """GFLOPs per image of one DiT forward, one LLM forward, a training step and a sampling call (see the module
    docstring), averaged over ``prompts``."""
    if not prompts:
        raise ValueError("measure_costs: no prompts")
    dit, text, sample = [], [], []
    for prompt in prompts:
        one, two = count_flops(pipe, prompt, 1, 1.0), count_flops(pipe, prompt, 2, 1.0)
        dit.append(two - one)
        text.append(one - (two - one))
        sample.append(count_flops(pipe, prompt, steps, guidance_scale))
    giga = 1e9
    dit_forward = sum(dit) / len(dit) / giga
    text_forward = sum(text) / len(text) / giga
    return {
        "dit_forward_gflops": dit_forward,
        "text_forward_gflops": text_forward,
        "train_gflops_per_image": 3 * dit_forward + (3 if text_trainable else 1) * text_forward,
        "sample_gflops_per_image": sum(sample) / len(sample) / giga,
    }
