"""Tests of the tiny caption LLM: tokenizer, save/load round trip, training, reuse."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusedit.config import ConfigError
from fusedit.data.config import ShapesWorldConfig
from fusedit.data.shapes import ShapesWorld
from fusedit.text.scene_objective import SceneObjective, scene_positions
from fusedit.text.tiny_llm import (
    BOS_ID,
    EOS_ID,
    MARKER_NAME,
    PAD_ID,
    UNK_ID,
    TinyLLMConfig,
    _encode_corpus,
    build_tiny_llm,
    corpus_hash,
    ensure_shapes_world_llm,
    ensure_tiny_llm,
    pretrain_tiny_llm,
    read_marker,
    train_caption_tokenizer,
)

CORPUS = [
    "a red circle",
    "a blue square",
    "two green triangles",
    "a red circle to the left of a blue square",
    "a yellow triangle above a white circle",
    "three purple squares",
    "a circle and a square",
    "a green square and a red triangle",
    "four white circles",
    "a blue triangle below a yellow square",
]
TINY = TinyLLMConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    intermediate_size=64,
    steps=40,
    batch_size=8,
    lr=1e-2,
    seed=0,
    max_length=16,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return pretrain_tiny_llm(CORPUS, tmp_path_factory.mktemp("tiny_llm"), TINY)


def test_tokenizer_specials_bos_and_round_trip():
    tok = train_caption_tokenizer(CORPUS, max_length=16)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (PAD_ID, EOS_ID, BOS_ID, UNK_ID)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<eos>", "<bos>", "<unk>"]
    ids = tok("A Red circle to the left of a blue square")["input_ids"]
    assert ids[0] == BOS_ID and UNK_ID not in ids and len(ids) == 1 + 10
    assert tok.decode(ids, skip_special_tokens=True) == "a red circle to the left of a blue square"
    assert tok("a pink dog")["input_ids"] == [BOS_ID, tok.convert_tokens_to_ids("a"), UNK_ID, UNK_ID]
    assert tok.padding_side == "left" and tok.model_max_length == 16


def test_tokenizer_left_pads(trained):
    tok = AutoTokenizer.from_pretrained(trained)
    assert tok.padding_side == "left" and tok.model_max_length == TINY.max_length
    batch = tok(
        ["a red circle", "two green triangles and", ""], padding="max_length", max_length=8, return_tensors="pt"
    )
    assert batch["input_ids"].shape == (3, 8)
    assert batch["input_ids"][0].tolist()[:4] == [PAD_ID] * 4 and batch["input_ids"][0, 4] == BOS_ID
    assert batch["attention_mask"][0].tolist() == [0] * 4 + [1] * 4
    assert batch["input_ids"][2].tolist() == [PAD_ID] * 7 + [BOS_ID]
    assert tok.decode(batch["input_ids"][1], skip_special_tokens=True) == "two green triangles and"


def test_save_load_round_trip_gives_identical_logits(trained):
    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    assert type(model).__name__ == "Gemma2ForCausalLM"
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        32,
        2,
        2,
        1,
        16,
    )
    assert cfg.sliding_window >= TINY.max_length and cfg.final_logit_softcapping is not None
    tok = AutoTokenizer.from_pretrained(trained)
    batch = tok(CORPUS[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    # a second save/load cycle of the loaded model reproduces the logits exactly
    resaved = trained.parent / (trained.name + "_resaved")
    model.save_pretrained(resaved)
    again = AutoModelForCausalLM.from_pretrained(resaved).eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, logits)
    # and the weights equal those the training run produced: the state dicts match tensor for tensor
    state, state2 = model.state_dict(), again.state_dict()
    assert state.keys() == state2.keys() and all(torch.equal(state[k], state2[k]) for k in state)


def test_in_memory_model_matches_loaded(tmp_path):
    tok = train_caption_tokenizer(CORPUS, max_length=16)
    model = build_tiny_llm(TINY, vocab_size=len(tok)).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    batch = tok(CORPUS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)


def test_build_is_seeded_and_does_not_touch_global_rng():
    state = torch.random.get_rng_state()
    a = build_tiny_llm(TINY, vocab_size=30).state_dict()
    b = build_tiny_llm(TINY, vocab_size=30).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_loss_decreases(trained):
    marker = read_marker(trained)
    assert marker["final_loss"] < 0.6 * marker["first_loss"], marker
    assert marker["config"] == json.loads(json.dumps(TINY.__dict__))


def test_trained_model_prefers_corpus_continuations(trained):
    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    tok = AutoTokenizer.from_pretrained(trained)
    ids = tok(["a red circle to the left of a"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        probs = model(ids).logits[0, -1].softmax(-1)
    assert probs[tok.convert_tokens_to_ids("blue")] > probs[tok.convert_tokens_to_ids("of")]


def test_ensure_reuses_matching_folder_and_retrains_otherwise(trained, capsys):
    before = (trained / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_llm(trained, CORPUS, TINY) == trained
    assert (trained / "model.safetensors").stat().st_mtime_ns == before
    assert "tiny-llm step" not in capsys.readouterr().out
    other = trained.parent / (trained.name + "_other")
    ensure_tiny_llm(other, CORPUS, TINY)
    changed = TinyLLMConfig(**{**TINY.__dict__, "steps": 2})
    ensure_tiny_llm(other, CORPUS, changed)
    assert read_marker(other)["config"]["steps"] == 2
    ensure_tiny_llm(other, CORPUS + ["a white square"], changed)
    assert read_marker(other)["num_captions"] == len(CORPUS) + 1
    assert "tiny-llm step" in capsys.readouterr().out
    (other / MARKER_NAME).write_text("not json")
    assert read_marker(other) is None


def test_shapes_world_llm_trains_on_the_chosen_corpus(tmp_path, capsys):
    world = ShapesWorld(ShapesWorldConfig(max_objects=2), 32)
    quick = TinyLLMConfig(**{**TINY.__dict__, "steps": 1, "max_length": TinyLLMConfig().max_length})
    folder = ensure_shapes_world_llm(tmp_path / "restated", world, quick)
    marker = read_marker(folder)
    assert marker["config"]["corpus"] == "restated"
    assert marker["corpus_sha256"] == corpus_hash(world.llm_corpus("restated"))
    assert marker["scene_sha256"] is not None and marker["final_scene_loss"] > 0  # the world's scene objective
    assert "truncated" not in capsys.readouterr().out  # the default max_length holds every restated caption
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.convert_tokens_to_ids("left") != UNK_ID and tok.convert_tokens_to_ids("is") != UNK_ID
    captions = TinyLLMConfig(**{**quick.__dict__, "corpus": "captions"})
    folder = ensure_shapes_world_llm(tmp_path / "captions", world, captions)
    assert read_marker(folder)["corpus_sha256"] == corpus_hash(world.caption_corpus())
    with pytest.raises(ConfigError, match="TinyLLMConfig.corpus: got 'poems'"):
        ensure_shapes_world_llm(tmp_path / "bad", world, TinyLLMConfig(corpus="poems"))
    # the scene objective over every caption: other labels, so another scene fingerprint (and a retrained LLM)
    full = TinyLLMConfig(**{**quick.__dict__, "scene_scope": "all"})
    everything = read_marker(ensure_shapes_world_llm(tmp_path / "all", world, full))
    assert everything["scene_sha256"] not in (None, marker["scene_sha256"]) and everything["final_scene_loss"] > 0
    with pytest.raises(ConfigError, match="TinyLLMConfig.scene_scope: got 'most'"):
        ensure_shapes_world_llm(tmp_path / "bad", world, TinyLLMConfig(scene_scope="most"))


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="corpus is empty"):
        train_caption_tokenizer([])
    with pytest.raises(TypeError, match="list of caption strings"):
        train_caption_tokenizer("a red circle")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        pretrain_tiny_llm(CORPUS, tmp_path, TinyLLMConfig(num_attention_heads=3, num_key_value_heads=2))


# -- the scene objective -----------------------------------------------------------------------------------------

#: a toy scene task on CORPUS: field 0 = which relation word the caption has (none / left / above / below),
#: field 1 = its first color (or 6 when it names none); the lines are the captions plus a suffix
SCENE_LINES = [c + " . done" for c in CORPUS]


def _toy_scene(lines=SCENE_LINES):
    captions = [line.split(" . ")[0] for line in lines]
    colors = ("red", "green", "blue", "yellow", "purple", "white")

    def labels(caption):
        relation = next((i for i, w in enumerate(("left", "above", "below"), start=1) if w in caption.split()), 0)
        color = next((colors.index(w) for w in caption.split() if w in colors), len(colors))
        return (relation, color)

    return SceneObjective(captions, [labels(c) for c in captions], (4, len(colors) + 1))


def testscene_positions_point_at_each_captions_last_token():
    tok = train_caption_tokenizer(SCENE_LINES, max_length=16)
    data = _encode_corpus(tok, SCENE_LINES, 16)
    positions = scene_positions(tok, data, _toy_scene())
    for row, caption in enumerate(_toy_scene().captions):
        assert tok.convert_ids_to_tokens(int(data["input_ids"][row, positions[row]])) == caption.split()[-1]
        assert tok.convert_ids_to_tokens(int(data["input_ids"][row, positions[row] + 1])) == "."
    shifted = SceneObjective(_toy_scene().captions[1:] + _toy_scene().captions[:1], _toy_scene().labels, (4, 7))
    with pytest.raises(ValueError, match="is not the beginning of corpus line 0"):
        scene_positions(tok, data, shifted)
    with pytest.raises(ValueError, match="2 captions for a corpus of 10 lines"):
        scene_positions(tok, data, SceneObjective(shifted.captions[:2], shifted.labels[:2], (4, 7)))


def test_scene_objective_is_learned_and_leaves_a_plain_llm(tmp_path):
    scene = _toy_scene()
    config = TinyLLMConfig(**{**TINY.__dict__, "steps": 60})
    folder = pretrain_tiny_llm(SCENE_LINES, tmp_path / "scene", config, scene)
    marker = read_marker(folder)
    assert marker["scene_sha256"] == scene.fingerprint()
    assert marker["final_scene_loss"] < 0.5 * marker["first_scene_loss"], marker
    # the saved model is a plain Gemma 2 causal LM: the same tensors as one trained without the objective
    plain = pretrain_tiny_llm(SCENE_LINES, tmp_path / "plain", config)
    assert read_marker(plain)["scene_sha256"] is None and read_marker(plain)["final_scene_loss"] is None
    a = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    b = AutoModelForCausalLM.from_pretrained(plain).state_dict()
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)
    # weight 0 turns it off: the same weights as no objective at all
    off = pretrain_tiny_llm(
        SCENE_LINES, tmp_path / "off", TinyLLMConfig(**{**config.__dict__, "scene_loss_weight": 0.0}), scene
    )
    c = AutoModelForCausalLM.from_pretrained(off).state_dict()
    assert all(torch.equal(b[k], c[k]) for k in b) and read_marker(off)["scene_sha256"] is None


def test_ensure_retrains_when_the_scene_objective_changes(tmp_path, capsys):
    config = TinyLLMConfig(**{**TINY.__dict__, "steps": 2})
    folder = ensure_tiny_llm(tmp_path, SCENE_LINES, config, _toy_scene())
    capsys.readouterr()
    assert ensure_tiny_llm(folder, SCENE_LINES, config, _toy_scene()) == folder
    assert "tiny-llm step" not in capsys.readouterr().out
    changed = SceneObjective(_toy_scene().captions, [(0, 0)] * len(SCENE_LINES), (4, 7))
    ensure_tiny_llm(folder, SCENE_LINES, config, changed)
    assert "tiny-llm step" in capsys.readouterr().out and read_marker(folder)["scene_sha256"] == changed.fingerprint()
    ensure_tiny_llm(folder, SCENE_LINES, config)
    assert "tiny-llm step" in capsys.readouterr().out and read_marker(folder)["scene_sha256"] is None


def test_scene_objective_errors():
    with pytest.raises(ValueError, match="2 captions but 1 label rows"):
        SceneObjective(["a", "b"], [(0,)], (2,))
    with pytest.raises(ValueError, match=r"labels \(0, 9\) of caption 'a red circle' do not fit the classes \(4, 7\)"):
        SceneObjective(["a red circle"], [(0, 9)], (4, 7))
    with pytest.raises(ValueError, match="at least one field of >= 2 classes"):
        SceneObjective(["a"], [()], ())
    assert SceneObjective(["a"], [(-100, 3)], (4, 7)).labels == ((-100, 3),)
    with pytest.raises(ConfigError, match="TinyLLMConfig.scene_loss_weight: got -1"):
        TinyLLMConfig(scene_loss_weight=-1).validate()


def test_scene_objective_needs_a_layer_past_the_first(tmp_path):
    one_layer = TinyLLMConfig(**{**TINY.__dict__, "num_hidden_layers": 1, "steps": 1})
    with pytest.raises(ValueError, match="a 1-layer tiny LLM has none"):
        pretrain_tiny_llm(SCENE_LINES, tmp_path, one_layer, _toy_scene())
    off = TinyLLMConfig(**{**one_layer.__dict__, "scene_loss_weight": 0.0})
    assert read_marker(pretrain_tiny_llm(SCENE_LINES, tmp_path, off, _toy_scene()))["scene_sha256"] is None
