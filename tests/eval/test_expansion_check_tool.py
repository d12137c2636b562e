"""``tools/expansion_check.py``: the share of prompts an LLM restates exactly, per category."""

from __future__ import annotations

from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import ShapesWorld
from fusedit.data.shapes_grammar import restatement
from fusedit.text.llm import load_tokenizer

from ..tool_loader import load_tool


class _Restates:
    """A stand-in expander that restates every prompt right, except those it is told to get wrong."""

    def __init__(self, tokenizer, wrong: set[str]):
        self.tokenizer, self.wrong, self.specs = tokenizer, wrong, {}

    def expand_all(self, prompts):
        return prompts

    def continuation(self, prompt):
        spec = self.specs[prompt]
        return "there is one circle ." if prompt in self.wrong else restatement(spec)


def test_right_and_wrong_restatements_are_counted(tiny_llm_dir):
    tool = load_tool("expansion_check")
    world = ShapesWorld(ShapesWorldConfig(), 32)
    specs = world.held_out_prompts("color_attr")[:4] + world.held_out_prompts("two_object")
    fake = _Restates(load_tokenizer(str(tiny_llm_dir)), wrong={specs[1].text})
    fake.specs = {s.text: s for s in specs}
    result = tool.restated_right(fake, specs)
    assert result["color_attr"][:2] == (3, 4) and result["color_attr"][2] == [
        f"{specs[1].text} -> there is one circle ."
    ]
    assert result["two_object"][:2] == (1, 1)
