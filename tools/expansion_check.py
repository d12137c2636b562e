"""Does the LLM restate held-out prompts right? What ``text.expansion: greedy`` would hand the DiT, per category.

    python tools/expansion_check.py LLM [--prompt-set held_out|training] [--show 3]

For every prompt of the default shapes world (held out by default: never in the tiny LLM's pretraining text), the
LLM continues ``prompt + " ."`` greedily (:class:`fusedit.text.expansion.PromptExpander`); the continuation is
compared, token by token, with the world's restatement of the prompt (:func:`fusedit.data.shapes.restatement`, what
the tiny LLM was pretrained to write after training captions). Prints the share restated exactly per category and
the first wrong ones.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import ShapesWorld
from fusedit.data.shapes_grammar import restatement


def restated_right(expander, specs) -> dict[str, tuple[int, int, list[str]]]:
    """Per category: (prompts restated exactly, prompts, wrong ones as 'prompt -> continuation')."""
    tokenizer = expander.tokenizer
    expander.expand_all([s.text for s in specs])
    result: dict[str, tuple[int, int, list[str]]] = {}
    for spec in specs:
        right, total, wrong = result.get(spec.category, (0, 0, []))
        said = expander.continuation(spec.text)
        same = tokenizer(said)["input_ids"] == tokenizer(restatement(spec))["input_ids"]
        result[spec.category] = (right + same, total + 1, wrong if same else wrong + [f"{spec.text} -> {said}"])
    return result


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("llm")
    parser.add_argument("--prompt-set", choices=["held_out", "training"], default="held_out")
    parser.add_argument("--show", type=int, default=3, help="wrong restatements shown per category")
    args = parser.parse_args(argv)
    from fusedit.text.expansion import PromptExpander
    from fusedit.text.llm import load_tokenizer

    world = ShapesWorld(ShapesWorldConfig(), 32)
    specs = world.held_out_prompts() if args.prompt_set == "held_out" else world.training_prompts()
    expander = PromptExpander.from_pretrained(args.llm, load_tokenizer(args.llm), " .", 32)
    for category, (right, total, wrong) in restated_right(expander, specs).items():
        print(f"{category:14s} {right}/{total} restated exactly" + "".join(f"\n    {w}" for w in wrong[: args.show]))


if __name__ == "__main__":
    main()
