"""How alike a text model's states at the last word of two prompts are, layer by layer.

    python tools/text_state_similarity.py LLM "a square and a triangle" "a triangle and a square" \
        "a circle and a triangle"

The first prompt is compared with each of the others: the cosine similarity of the hidden states at their last
token, for the embeddings (layer 0) and after every decoder layer. Deep fusion reads keys and values projected from
these states, so a held-out prompt whose last word's states resemble those of a training prompt with other content
gives the DiT that training prompt's cue. Layer 0 is a function of the last word alone (1.0 for the same word).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch


def last_token_states(model, tokenizer, prompt: str) -> list[torch.Tensor]:
    """The hidden states ``(hidden,)`` at the last token of ``prompt``, one per layer (embeddings first)."""
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        states = model(**ids, output_hidden_states=True).hidden_states
    return [layer[0, -1].float() for layer in states]


def similarities(model, tokenizer, prompt: str, other: str) -> list[float]:
    """Cosine similarity of the last-token states of ``prompt`` and ``other``, per layer."""
    pairs = zip(last_token_states(model, tokenizer, prompt), last_token_states(model, tokenizer, other), strict=True)
    return [float(torch.cosine_similarity(a, b, dim=0)) for a, b in pairs]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("llm", help="a causal LM folder or hub id (e.g. a study's tiny-llm)")
    parser.add_argument("prompt")
    parser.add_argument("others", nargs="+")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.llm)
    model = AutoModelForCausalLM.from_pretrained(args.llm).eval()
    for other in args.others:
        values = " ".join(f"{v:+.2f}" for v in similarities(model, tokenizer, args.prompt, other))
        print(f"{args.prompt!r} vs {other!r}: layer 0..{model.config.num_hidden_layers}: {values}")


if __name__ == "__main__":
    main()
