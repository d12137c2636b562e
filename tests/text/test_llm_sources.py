"""Issue 17, item 7: a missing local LLM folder is reported at once as a missing folder (never tried as a hub id),
and a hub id the hub cannot serve (offline mode, no network) fails at once unless the local cache has it."""

from __future__ import annotations

import socket
import time

import pytest
import transformers

import fusedit.text.llm as llm
from fusedit.cli import main as cli
from fusedit.text.llm import LLMLoadError, load_llm_config, load_tokenizer, looks_like_local_path


@pytest.fixture(autouse=True)
def fresh_probe(monkeypatch):
    """Forget the once-per-process network probe; fail the test if transformers is asked to load anything unless a
    test says otherwise."""
    llm._hub_probe.cache_clear()
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError(f"transformers was asked to load {args[:1]} {kwargs}")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    yield
    llm._hub_probe.cache_clear()


@pytest.mark.parametrize(
    "name,local",
    [
        ("google/gemma-2-2b", False),
        ("gpt2", False),
        ("some/missing/dir", True),  # more than one '/'
        ("./llm", True),
        ("../llm", True),
        ("/models/llm", True),
        ("~/llm", True),
        ("models\\llm", True),
    ],
)
def test_the_local_path_rule(name, local):
    assert looks_like_local_path(name) is local


def test_a_hub_like_name_whose_first_folder_exists_here_is_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_local_path("runs/tiny-llm")
    (tmp_path / "runs").mkdir()
    assert looks_like_local_path("runs/tiny-llm")
    with pytest.raises(LLMLoadError, match=r"the local folder 'runs/tiny-llm' does not exist \(runs exists, 'tiny"):
        load_llm_config("runs/tiny-llm")


def test_a_missing_local_folder_is_reported_at_once(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    monkeypatch.chdir(tmp_path)  # `fusedit train demo` opens runs/demo in the working directory
    start = time.perf_counter()
    assert cli(["train", "demo", "text.llm=some/missing/dir"]) == 2
    assert time.perf_counter() - start < 5
    assert capsys.readouterr().err == (
        "error: text.llm: the local folder 'some/missing/dir' does not exist; give the folder of a saved model "
        "(save_pretrained) or a hub id like OWNER/NAME\n"
    )


def test_a_hub_id_offline_and_not_cached_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("probed the network"))
    with pytest.raises(
        LLMLoadError,
        match=r"'nobody/no-such-llm' is a Hugging Face hub id, it is not in the local "
        r"cache .* \(HF_HUB_OFFLINE is set\); download it where there is network",
    ):
        load_llm_config("nobody/no-such-llm")
    with pytest.raises(LLMLoadError, match="text.tokenizer: 'nobody/no-such-llm' is a Hugging Face hub id"):
        load_tokenizer("nobody/no-such-llm")


def test_a_hub_id_without_network_fails_at_once(monkeypatch):
    probes = []

    def unreachable(address, timeout=None):
        probes.append((address, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(LLMLoadError, match=r"no network: huggingface.co:443 is unreachable"):
        load_llm_config("nobody/no-such-llm")
    with pytest.raises(LLMLoadError, match="no network"):
        load_llm_config("nobody/other")
    assert probes == [(("huggingface.co", 443), llm.HUB_PROBE_TIMEOUT)]  # probed once per process


def test_a_cached_hub_id_loads_from_the_cache_when_offline(monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: f"/cache/{repo}/{name}")
    seen = {}

    def from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        return "config"

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    assert load_llm_config("owner/cached-llm") == "config"
    assert seen == {"name": "owner/cached-llm", "local_files_only": True}


def test_a_reachable_hub_is_left_to_transformers(monkeypatch):
    class Connection:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: Connection())
    seen = {}
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda name, **kw: seen.update(kw) or "config")
    assert load_llm_config("owner/llm") == "config" and seen == {}
