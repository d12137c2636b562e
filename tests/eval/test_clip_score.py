"""CLIP score with a tiny random CLIP model saved to a temporary folder."""

import json

import pytest
import torch
from PIL import Image

from fusedit.eval.clip_score import clip_score

WORDS = "a red blue green cat dog photo of on the".split()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny-clip")
    vocab = {"<unk>": 0, "<pad>": 1, "<bos>": 2, "<eos>": 3}
    for word in WORDS:
        vocab[word] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=8,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    with torch.no_grad():  # share a direction between the towers so cosines are positive, yet varied
        model.text_projection.weight.copy_(model.visual_projection.weight)
        model.text_model.final_layer_norm.bias.fill_(3.0)
        model.vision_model.post_layernorm.bias.fill_(3.0)
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


def _images(n):
    g = torch.Generator().manual_seed(1)
    return [
        Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy()) for _ in range(n)
    ]


PROMPTS = ["a red cat", "a photo of a blue dog on the green", "dog", "the cat"]


def _reference_score(clip_dir, images, prompts):
    """Independent path: CLIPModel.forward's logits are logit_scale·cos."""
    from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(clip_dir)
    proc = CLIPImageProcessorPil.from_pretrained(clip_dir)
    scores = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            out = model(
                **tok([prompt], return_tensors="pt", truncation=True, max_length=8),
                pixel_values=proc(images=[image], return_tensors="pt")["pixel_values"],
            )
            cos = out.logits_per_image[0, 0] / model.logit_scale.exp()
            scores.append(100 * max(cos.item(), 0.0))
    return sum(scores) / len(scores)


def test_matches_clip_forward_and_is_batch_invariant(clip_dir):
    images = _images(4)
    expected = _reference_score(clip_dir, images, PROMPTS)
    for batch_size in (1, 3, 4):
        assert clip_score(images, PROMPTS, clip_dir, batch_size=batch_size) == pytest.approx(expected, abs=1e-4)
    assert 0.0 < expected < 100.0


def test_prompt_matters_and_paths_equal_images(clip_dir, tmp_path):
    images = _images(2)
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    a = clip_score(images, ["a red cat", "dog"], clip_dir)
    assert clip_score(paths, ["a red cat", "dog"], clip_dir) == pytest.approx(a, abs=1e-5)
    b = clip_score(images, ["blue", "the green photo"], clip_dir)
    assert a > 0 and b > 0
    assert a != pytest.approx(b, abs=1e-3)


def test_user_errors(clip_dir, tmp_path):
    images = _images(2)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(images, ["a red cat"], clip_dir)
    with pytest.raises(TypeError, match="single string"):
        clip_score(images[:1], "a red cat", clip_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip_score(images, ["a", "b"], tmp_path / "missing")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text(json.dumps({}))
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        clip_score(images, ["a", "b"], tmp_path / "partial")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        clip_score([tmp_path / "nope.png"], ["a"], clip_dir)
