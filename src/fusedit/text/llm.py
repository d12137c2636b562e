"""Loading decoder-only LLMs and their tokenizers from a local path or a Hugging Face hub id.

Any causal LM whose decoder follows the transformers layout (``embed_tokens``, ``layers[i].self_attn.{q,k,v}_proj``,
a ``Cache``-aware attention) works: Gemma, Gemma 2, Gemma 3 (text), Llama, Qwen2, Qwen3, and PaliGemma's language
model. Only the decoder is kept (no LM head).
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fusedit.config import ConfigError
from fusedit.lowmem import import_bitsandbytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: Seconds to wait for a TCP connection to the hub before calling it unreachable.
HUB_PROBE_TIMEOUT = 3.0


class LLMLoadError(RuntimeError):
    """The LLM or tokenizer could not be loaded; the message says from where and why."""


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 elsewhere; other names map to torch dtypes."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype: got {name!r}, expected auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def looks_like_local_path(name: str) -> bool:
    """Whether ``text.llm``/``text.tokenizer`` value ``name`` names a local folder rather than a hub id.

    The rule: a hub id is ``NAME`` or ``OWNER/NAME``. Anything else is a local path: a name that exists on disk,
    starts with ``.``, ``/`` or ``~`` (``./llm``, ``../llm``, ``/models/llm``, ``~/llm``), contains a backslash
    (or the platform's separator when it is not ``/``), has more than one ``/`` (``runs/demo/tiny-llm``), or whose
    first component is an existing local folder (``runs/tiny-llm`` when ``runs/`` exists here).
    """
    if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or "\\" in name:
        return True
    if os.sep != "/" and os.sep in name:
        return True
    return name.count("/") > 1 or ("/" in name and Path(name.split("/", 1)[0]).is_dir())


def _missing_folder(name: str, what: str) -> LLMLoadError:
    path = Path(name).expanduser()
    existing = next((p for p in path.parents if p != Path(".") and p.exists()), None)
    where = f" ({existing} exists, {path.relative_to(existing).parts[0]!r} is not in it)" if existing else ""
    return LLMLoadError(
        f"text.{what}: the local folder {name!r} does not exist{where}; give the folder of a saved model "
        f"(save_pretrained) or a hub id like OWNER/NAME"
    )


def _offline_env() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on")
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


@functools.lru_cache(maxsize=1)
def _hub_probe() -> str | None:
    """Why a TCP connection to the hub fails from here, or None when it succeeds (or a proxy decides: then the hub
    client finds out). Probed once per process."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT).close()
    except OSError as error:
        return f"no network: {host}:{port} is unreachable ({error})"
    return None


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now (``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` set, or no
    connection), or None."""
    if _offline_env():
        return "HF_HUB_OFFLINE is set"
    return _hub_probe()


def _check_source(name_or_path: str, what: str, probe_file: str) -> dict:
    """Check ``text.<what>`` before transformers sees it; returns extra ``from_pretrained`` arguments.

    A missing local folder (see :func:`looks_like_local_path`) is reported at once. A hub id that the hub cannot
    serve right now (offline mode, no network) loads from the local cache when ``probe_file`` is there
    (``local_files_only``), else fails at once instead of retrying the connection.
    """
    if not name_or_path:
        raise ConfigError(f"text.{what}: empty; expected a local path or a Hugging Face hub id of a decoder-only LLM")
    if looks_like_local_path(name_or_path):
        if not Path(name_or_path).expanduser().exists():
            raise _missing_folder(name_or_path, what)
        return {}
    why = hub_unreachable()
    if why is None:
        return {}
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name_or_path, probe_file), str):
        return {"local_files_only": True}
    raise LLMLoadError(
        f"text.{what}: {name_or_path!r} is a Hugging Face hub id, it is not in the local cache "
        f"({constants.HF_HUB_CACHE}) and the hub cannot be reached ({why}); download it where there is network "
        f"(`hf download {name_or_path}`) and give its local folder, or set HF_HOME to a cache that has it"
    )


def load_llm_config(name_or_path: str):
    """The Hugging Face config of the model at ``name_or_path`` (text config for multimodal models)."""
    from transformers import AutoConfig

    hub = _check_source(name_or_path, "llm", "config.json")
    try:
        config = AutoConfig.from_pretrained(name_or_path, **hub)
    except Exception as error:  # transformers raises OSError/ValueError with long texts
        raise LLMLoadError(f"could not read the LLM config at {name_or_path!r}: {error}") from None
    return config


def reference_attention_config(config):
    """A copy of ``config`` whose attention computes like the reference's fused layers.

    tang-bd/fuse-dit computes the LLM stream's attention inside fused layers with plain SDPA: scale
    ``head_dim^-0.5``, no logit soft-capping and no sliding window (``docs/design.md``, "Reference checkpoints").
    """
    config = copy.deepcopy(config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if hasattr(text, "attn_logit_softcapping"):
        text.attn_logit_softcapping = None
    if hasattr(text, "query_pre_attn_scalar"):
        text.query_pre_attn_scalar = head_dim
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = ["full_attention"] * len(text.layer_types)
    if hasattr(text, "use_sliding_window"):
        text.use_sliding_window = False
    return config


def extract_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (``embed_tokens`` + ``layers``) of a causal or image-text-to-text model."""
    candidates = [model]
    for attr in ("model", "language_model"):
        for holder in list(candidates):
            child = getattr(holder, attr, None)
            if isinstance(child, nn.Module):
                candidates.append(child)
    for candidate in reversed(candidates):
        if hasattr(candidate, "layers") and hasattr(candidate, "embed_tokens"):
            return candidate
    raise LLMLoadError(f"{type(model).__name__} has no decoder with embed_tokens and layers; not a decoder-only LLM")


def load_llm(name_or_path: str, **options: Any) -> nn.Module:
    """Load the decoder of a causal LM (or of PaliGemma's language model): the decoder module (e.g.
    ``Gemma2Model``) of :func:`load_causal_lm` with the same arguments, in eval mode."""
    decoder = extract_decoder(load_causal_lm(name_or_path, **options))
    decoder.eval()
    return decoder


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype = torch.float32,
    attention: Literal["hf", "reference"] = "hf",
    attn_implementation: str | None = None,
    quantization: Literal["none", "int8"] = "none",
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The whole model at ``name_or_path`` with its output head (a causal LM, or an image-text-to-text model), in
    eval mode, where ``from_pretrained`` put it.

    Args:
        name_or_path: local folder or hub id.
        dtype: weights dtype.
        attention: ``reference`` patches the config as :func:`reference_attention_config`.
        attn_implementation: transformers attention backend (``sdpa`` default, ``eager``).
        quantization: ``int8`` loads the linear layers in 8 bits on ``device`` (bitsandbytes' LLM.int8 through
            ``BitsAndBytesConfig``; :class:`~fusedit.config.ConfigError` where bitsandbytes is missing); the model is
            then already on ``device`` (``device`` places nothing else).
    Raises:
        LLMLoadError: transformers cannot load it.
    """
    from transformers import AutoModelForCausalLM

    config = load_llm_config(name_or_path)
    if attention == "reference":
        config = reference_attention_config(config)
    kwargs = {"config": config, "dtype": dtype, **_check_source(name_or_path, "llm", "config.json")}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization == "int8":
        kwargs.update(int8_load_kwargs(device))
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except ValueError:
        try:
            from transformers import AutoModelForImageTextToText

            model = AutoModelForImageTextToText.from_pretrained(name_or_path, **kwargs)
        except Exception as error:
            raise LLMLoadError(f"{name_or_path!r} is not a causal LM transformers can load: {error}") from None
    except Exception as error:
        raise LLMLoadError(f"could not load the LLM from {name_or_path!r}: {error}") from None
    return model.eval()


def int8_load_kwargs(device: torch.device | str) -> dict:
    """``from_pretrained`` arguments loading the linear layers in 8 bits (LLM.int8) on ``device``."""
    import_bitsandbytes("text.quantization=int8")
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True), "device_map": {"": str(torch.device(device))}}


def load_tokenizer(name_or_path: str, padding_side: str = "left"):
    """Load a tokenizer and set its padding side; a missing pad token falls back to EOS (reported in the name)."""
    from transformers import AutoTokenizer

    hub = _check_source(name_or_path, "tokenizer", "tokenizer_config.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **hub)
    except Exception as error:
        raise LLMLoadError(f"could not load the tokenizer from {name_or_path!r}: {error}") from None
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise LLMLoadError(f"tokenizer {name_or_path!r} has neither a pad nor an eos token; add a pad token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def decoder_forward_kwargs(decoder: nn.Module) -> str:
    """Name of the cache argument of ``decoder.forward`` (``cache`` in newer transformers, else ``past_key_values``)."""
    parameters = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"
