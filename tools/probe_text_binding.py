"""Does a text model's state at an object's shape word carry that object's color? A linear probe per LLM layer.

    python tools/probe_text_binding.py LLM [--seed 0]

For every two-object prompt of the shapes world (``position`` and ``color_attr``, training and held-out) whose two
objects differ in color, the text model ``LLM`` (a folder or hub id, e.g. a study's ``tiny-llm``) encodes the prompt
once. At each object's shape word ("circle", "square", ...) it takes what deep fusion hands a DiT layer, the keys
before RoPE and the values of every LLM layer (``H_kv x head_dim`` numbers each), and what the shallow baselines
read, the last hidden state. A multinomial logistic regression per feature set is fitted on three quarters of the
prompts to name the object's color, and scored on the other quarter (whole prompts held out).

High accuracy means the pairing "this shape has that color" is linearly present where an image token could read it
by content; chance (1 / number of colors) means it is not. Layer 0's keys and values are a function of the shape
word alone (a causal model has mixed in no other token yet), so they sit at chance by construction: the control.
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence

import torch

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import PromptSpec, ShapesWorld
from fusedit.text.config import TextConfig
from fusedit.text.context import TextRequirements
from fusedit.text.encoder import TextEncoder

CATEGORIES = ("position", "color_attr")


def two_color_prompts(world: ShapesWorld) -> list[PromptSpec]:
    """The world's two-object prompts (training and held-out) whose objects differ in color."""
    specs = [s for c in CATEGORIES for s in world.training_prompts(c) + world.held_out_prompts(c)]
    return [s for s in specs if len(s.objects) == 2 and s.objects[0].color != s.objects[1].color]


def shape_word_features(
    encoder: TextEncoder, specs: Sequence[PromptSpec], shapes: Sequence[str], batch_size: int = 64
) -> tuple[dict[str, torch.Tensor], list[str], list[int]]:
    """``(features, colors, prompt_index)``: per feature set a ``(N, F)`` tensor with one row per object (two per
    prompt, in prompt order), the color of each row's object and the index of its prompt in ``specs``."""
    layers = sorted(encoder.requirements.raw_key_layers)
    rows: dict[str, list[torch.Tensor]] = {}
    colors, prompt_index = [], []
    for start in range(0, len(specs), batch_size):
        batch = specs[start : start + batch_size]
        texts = [s.text for s in batch]
        input_ids = encoder.tokenize(texts).input_ids
        with torch.no_grad():
            context = encoder.encode(texts)
        if input_ids.shape[1] != context.mask.shape[1]:
            raise ValueError(f"tokens {tuple(input_ids.shape)} and context {tuple(context.mask.shape)} do not align")
        for b, spec in enumerate(batch):
            words = [w.lstrip("▁Ġ") for w in encoder.tokenizer.convert_ids_to_tokens(input_ids[b].tolist())]
            at = [j for j, w in enumerate(words) if w in shapes and bool(context.mask[b, j])]
            if len(at) != len(spec.objects):
                raise ValueError(f"{spec.text!r}: found {len(at)} shape words in its tokens {words}")
            for obj, j in zip(spec.objects, at, strict=True):
                colors.append(obj.color)
                prompt_index.append(start + b)
                for layer in layers:
                    rows.setdefault(f"key L{layer}", []).append(context.raw_keys[layer][b, :, j].flatten())
                    rows.setdefault(f"value L{layer}", []).append(context.values[layer][b, :, j].flatten())
                assert context.hidden_states is not None
                rows.setdefault("hidden (last)", []).append(context.hidden_states[b, j])
    return {name: torch.stack(r).float() for name, r in rows.items()}, colors, prompt_index


def probe_accuracy(x: torch.Tensor, y: torch.Tensor, test: torch.Tensor, weight_decay: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression ``x (N, F) -> y (N,)`` fitted on ``~test`` rows
    (features standardised with the training rows' statistics; L-BFGS, L2 penalty ``weight_decay``)."""
    train = ~test
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    classes = int(y.max()) + 1
    weight = torch.zeros(x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[train] @ weight + bias, y[train])
        loss = loss + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((x[test] @ weight + bias).argmax(1) == y[test]).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("llm", help="the text model: a saved folder (e.g. runs/studies/fusion/tiny-llm) or hub id")
    parser.add_argument("--seed", type=int, default=0, help="which quarter of the prompts is held out")
    args = parser.parse_args(argv)
    world = ShapesWorld(ShapesWorldConfig(), 32)
    specs = two_color_prompts(world)
    shapes = sorted({o.shape for s in specs for o in s.objects})
    encoder = TextEncoder.from_config(TextConfig(llm=args.llm, padding="longest"), _requirements(args.llm))
    features, colors, prompt_index = shape_word_features(encoder, specs, shapes)
    names = sorted(set(colors))
    y = torch.tensor([names.index(c) for c in colors])
    order = list(range(len(specs)))
    random.Random(args.seed).shuffle(order)
    held_out = set(order[: len(order) // 4])
    test = torch.tensor([i in held_out for i in prompt_index])
    print(f"{len(specs)} prompts, {len(colors)} shape words, {len(names)} colors: chance {1 / len(names):.2f}")
    print("| feature at the shape word | numbers | held-out accuracy |\n|---|---|---|")
    for name, x in features.items():
        print(f"| {name} | {x.shape[1]} | {probe_accuracy(x, y, test):.2f} |")
    return 0


def _requirements(llm: str) -> TextRequirements:
    """Every layer's pre-RoPE keys and values, and the last hidden state."""
    from transformers import AutoConfig

    layers = tuple(range(AutoConfig.from_pretrained(llm).num_hidden_layers))
    return TextRequirements(raw_key_layers=layers, hidden_states_index=-1)


if __name__ == "__main__":
    raise SystemExit(main())
