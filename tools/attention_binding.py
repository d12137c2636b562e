"""Does an image patch of one object attend to that object's words more than to the other object's?

    python tools/attention_binding.py RUN [RUN ...] [--prompts 96] [--sigmas 0.9 0.6 0.3] [--seed 0]

For two-object prompts of the shapes world (``position`` and ``color_attr``, held-out and training) whose objects
differ in both color and shape (``a red square to the left of a blue circle``), a ground-truth scene is rendered,
noised to ``σ`` (``x_σ = (1 − σ)·x₀ + σ·ε``) and run once through the model (``RUN``: a training run or exported
pipeline). Every attention that reads the text records its probabilities, averaged over heads. A patch belongs to
object A when at least 30 % of its pixels are A's and under 5 % are B's. For those patches the tool reports the
attention mass on A's shape word and on B's (and likewise for the color words), and *own-share*, the fraction of
patches that give their own word more mass than the other object's.

Own-share 0.5 means the attention does not tell the two objects' words apart, which is what a model that draws the
right shapes in the wrong places, or one shape twice, would show. Near 1 means each object's patches read their own
object's word: the binding that ``tools/shapes_binding.py`` counts in the finished images, here at its source.

Text attentions are numbered in the order the forward runs them (``text attention k``): the DiT block index when
every block reads the text (deep fusion's layer map, the shallow baselines); blocks that attend to image tokens
only (past the layer map, or the image self-attention beside a cross-attention) are not counted.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

import fusedit.models.attention as attention_module
from fusedit.data.shapes import PromptSpec, ShapesWorld, image_to_tensor, object_side, shape_mask
from fusedit.data.shapes_grammar import COLORS, SHAPES
from fusedit.flow import interpolate, timestep_input

CATEGORIES = ("position", "color_attr")
OWN_MIN, OTHER_MAX = 0.3, 0.05  # a patch is object A's: >= 30 % of its pixels A's, < 5 % B's


def two_object_prompts(world: ShapesWorld) -> list[PromptSpec]:
    """Prompts with two single objects that differ in color and in shape (training and held-out)."""
    specs = [s for c in CATEGORIES for s in world.held_out_prompts(c) + world.training_prompts(c)]
    return [
        s
        for s in specs
        if len(s.objects) == 2
        and all(o.count == 1 and o.color is not None for o in s.objects)
        and s.objects[0].color != s.objects[1].color
        and s.objects[0].shape != s.objects[1].shape
    ]


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """The probabilities ``(B, H, N, M)`` of ``fusedit.models.layers.attend(q, k, v, key_mask)``: ``q (B, H, N, D)``,
    ``k (B, H_kv, M, D)``, scale ``D^-0.5``, ``key_mask (B, M)`` True = attend. Grouped-query attention: query head
    ``h`` reads key head ``h // (H / H_kv)``, as SDPA's ``enable_gqa`` does."""
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q.float() @ keys.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


@contextmanager
def recorded_attention() -> Iterator[list[torch.Tensor]]:
    """Within the block, every attention of the DiT (``fusedit.models.attention.attend``) appends its probabilities
    ``(B, N, M)``, averaged over query heads, to the yielded list; the attention output itself is unchanged."""
    real = attention_module.attend
    calls: list[torch.Tensor] = []

    def spy(q, k, v, key_mask):
        calls.append(attention_probabilities(q, k, key_mask).mean(1))
        return real(q, k, v, key_mask)

    attention_module.attend = spy
    try:
        yield calls
    finally:
        attention_module.attend = real


def text_attention(calls: Sequence[torch.Tensor], num_text: int, num_patches: int) -> list[torch.Tensor]:
    """The text columns ``(B, N, L)`` of every call that read the text: joint attention (keys ``[text; image]``,
    ``M = L + N``) or cross-attention (``M = L``); image-only attention (``M = N``) is skipped."""
    if num_text == num_patches:
        raise ValueError(f"{num_text} text tokens and {num_patches} patches: cannot tell the attentions apart")
    return [c[..., :num_text] for c in calls if c.shape[-1] in (num_text, num_text + num_patches)]


def patch_fractions(world: ShapesWorld, placed, patch: int) -> list[np.ndarray]:
    """Per placed object, the fraction of each patch's pixels it covers: ``(N,)`` in row-major patch order."""
    side = world.resolution // patch
    fractions = []
    for obj in placed:
        mask = np.zeros((world.resolution, world.resolution), dtype=bool)
        size = obj.side or object_side(obj.size, world.resolution)
        mask[obj.y : obj.y + size, obj.x : obj.x + size] = shape_mask(obj.shape, size, size)
        fractions.append(mask.reshape(side, patch, side, patch).mean(axis=(1, 3)).reshape(-1))
    return fractions


@dataclass
class Tally:
    """Attention mass of one object's patches on its own word and on the other object's, patch by patch."""

    own: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)

    def add(self, own: float, other: float) -> None:
        self.own.append(own)
        self.other.append(other)

    def summary(self) -> str:
        own, other = np.array(self.own), np.array(self.other)
        return f"own {own.mean():.3f} other {other.mean():.3f} own-share {np.mean(own > other):.2f}"


def word_positions(encoder, text: str, num_text: int) -> tuple[list[int], list[int]]:
    """Token indices of the shape words and of the color words of ``text``, in prompt order."""
    ids = encoder.tokenize([text]).input_ids[0].tolist()
    words = [w.lstrip("▁Ġ") for w in encoder.tokenizer.convert_ids_to_tokens(ids) if w != encoder.tokenizer.pad_token]
    if len(words) != num_text:
        raise ValueError(f"{text!r}: {len(words)} tokens {words} but a text context of {num_text}")
    return [j for j, w in enumerate(words) if w in SHAPES], [j for j, w in enumerate(words) if w in COLORS]


def measure(model, encoder, world: ShapesWorld, specs: Sequence[PromptSpec], sigma: float, seed: int) -> dict:
    """``{(text attention k, "shape" | "color"): Tally}`` over ``specs`` at noise ``sigma`` (one scene each)."""
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    tallies: dict = defaultdict(Tally)
    for spec in specs:
        placed = world.scene(spec, rng)
        x0 = image_to_tensor(world.draw(placed))[None]
        x_sigma = interpolate(x0, torch.randn(x0.shape, generator=generator), torch.tensor(sigma))
        with torch.no_grad():
            context = encoder.encode([spec.text])
            num_text = context.mask.shape[1]
            with recorded_attention() as calls:
                model(x_sigma, timestep_input(torch.tensor([sigma])), context)
        fractions = patch_fractions(world, placed, model.patch_size)
        shape_at, color_at = word_positions(encoder, spec.text, num_text)
        # scene objects are in prompt order: placed[i] is spec.objects[i], and so are the words
        for k, probs in enumerate(text_attention(calls, num_text, fractions[0].size)):
            for own, other in ((0, 1), (1, 0)):
                mine = np.flatnonzero((fractions[own] >= OWN_MIN) & (fractions[other] < OTHER_MAX))
                for p in mine:
                    row = probs[0, p]
                    tallies[k, "shape"].add(float(row[shape_at[own]]), float(row[shape_at[other]]))
                    tallies[k, "color"].add(float(row[color_at[own]]), float(row[color_at[other]]))
    return tallies


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="training runs or exported pipelines")
    parser.add_argument("--prompts", type=int, default=96, help="two-object prompts drawn (default 96)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.9, 0.6, 0.3], help="noise levels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompts drawn, the scenes and the noise")
    args = parser.parse_args(argv)
    from fusedit.eval.shapes_eval import world_from_config
    from fusedit.sampling.loading import load_pipeline

    torch.set_num_threads(1)
    for run in args.runs:
        pipe = load_pipeline(run, device="cpu")
        world = world_from_config(pipe.experiment)
        specs = two_object_prompts(world)
        order = np.random.default_rng(args.seed).permutation(len(specs))[: args.prompts]
        specs = [specs[i] for i in sorted(order)]
        print(f"== {run}: {len(specs)} prompts, one scene each")
        for sigma in args.sigmas:
            tallies = measure(pipe.transformer, pipe.context_encoder, world, specs, sigma, args.seed)
            for k in sorted({k for k, _ in tallies}):
                shape, color = tallies[k, "shape"], tallies[k, "color"]
                print(
                    f"sigma {sigma:.2f} text attention {k}: shape word {shape.summary()} | "
                    f"color word {color.summary()} ({len(shape.own)} patches)"
                )


if __name__ == "__main__":
    main()
