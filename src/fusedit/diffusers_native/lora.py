"""LoRA adapters on the pipeline, the way diffusers users load them: :class:`FuseDiTLoraLoaderMixin`.

::

    pipe.load_lora_weights("runs/teal/final/adapter", adapter_name="teal")   # a folder fusedit writes (peft's format)
    pipe.set_adapters(["teal", "other"], [1.0, 0.5])
    pipe.fuse_lora(); pipe.unfuse_lora(); pipe.unload_lora_weights()

The machinery is diffusers' own (``LoraBaseMixin`` on the pipeline, ``PeftAdapterMixin`` on the transformer,
transformers' adapters on the LLM); this class adds the reading of fusedit's adapter folders
(:mod:`fusedit.finetune.adapters`: ``adapter_model.safetensors`` + ``adapter_config.json``, the LLM's adapters in
``text_encoder/``) next to diffusers' own LoRA files (``pytorch_lora_weights.safetensors`` with ``transformer.`` /
``text_encoder.`` keys), and drops the pipeline's cached unconditional text context whenever the adapters change
(an LLM adapter changes what the LLM hands the DiT).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_base import LoraBaseMixin, _fetch_state_dict, _load_lora_into_text_encoder
from diffusers.utils import get_adapter_name
from torch import nn

from fusedit.finetune.adapters import AdapterPart, is_adapter_folder, lora_kwargs, read_adapter

TRANSFORMER = "transformer"
TEXT_ENCODER = "text_encoder"
PEFT_PREFIX = "base_model.model."


def _prefixed(part: AdapterPart, component: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An adapter part's weights and ``LoraConfig`` keywords under diffusers' ``<component>.`` prefix."""
    weights = {f"{component}.{k.removeprefix(PEFT_PREFIX)}": v for k, v in part.weights.items()}
    return weights, {f"{component}.{k}": v for k, v in lora_kwargs(part.config).items()}


def lora_state_of(dit: AdapterPart, llm: AdapterPart | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Adapter parts as diffusers' LoRA state dict (``transformer.<module>.lora_A.weight``, ``text_encoder.``...)
    and its adapter metadata (``transformer.r``, ``transformer.lora_alpha``, ...)."""
    weights, metadata = _prefixed(dit, TRANSFORMER)
    if llm is not None:
        llm_weights, llm_metadata = _prefixed(llm, TEXT_ENCODER)
        weights.update(llm_weights)
        metadata.update(llm_metadata)
    return weights, metadata


def read_lora_folder(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A fusedit adapter folder (:mod:`fusedit.finetune.adapters`) as :func:`lora_state_of` gives it."""
    return lora_state_of(*read_adapter(Path(path)))


def check_fits(state: dict[str, torch.Tensor], components: dict[str, nn.Module]) -> None:
    """Raise ``ValueError`` unless every ``<component>.<module>.lora_A/B.weight`` of ``state`` names a linear layer of
    that component with matching features (adapters trained for another model are refused before any is loaded)."""
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        kind = ".lora_A." if ".lora_A." in rest else ".lora_B." if ".lora_B." in rest else None
        if kind is None or not rest.endswith(".weight"):
            continue
        module_name = rest.split(kind)[0]
        try:
            module = components[component].get_submodule(module_name)
        except AttributeError:
            raise ValueError(f"LoRA weight {key!r}: the {component} has no module {module_name!r}") from None
        base = getattr(module, "base_layer", module)
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRA weight {key!r}: {component}.{module_name} is not a linear layer")
        expected = base.in_features if kind == ".lora_A." else base.out_features
        got = tensor.shape[1] if kind == ".lora_A." else tensor.shape[0]
        if got != expected:
            raise ValueError(
                f"LoRA weight {key!r} has shape {tuple(tensor.shape)}, but {component}.{module_name} has "
                f"{base.in_features} inputs and {base.out_features} outputs: adapters of another model"
            )


class FuseDiTLoraLoaderMixin(LoraBaseMixin):
    """``load_lora_weights`` / ``set_adapters`` / ``fuse_lora`` / ``unfuse_lora`` / ``unload_lora_weights`` /
    ``delete_adapters`` / ``disable_lora`` / ``enable_lora`` of :class:`~fusedit.diffusers_native.pipeline.
    FuseDiTPipeline` (see the module docstring)."""

    _lora_loadable_modules = [TRANSFORMER, TEXT_ENCODER]
    transformer: Any  # the pipeline's components
    text_encoder: Any
    transformer_name = TRANSFORMER
    text_encoder_name = TEXT_ENCODER

    @classmethod
    def lora_state_dict(cls, pretrained_model_name_or_path_or_dict: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """``{name: tensor}`` of a fusedit adapter folder, a diffusers LoRA file/folder or a state dict (with
        ``return_lora_metadata=True``: ``(state dict, metadata)``; a state dict's metadata may come as
        ``metadata=``: ``LoraConfig`` keywords under the component's prefix, see :func:`lora_state_of`)."""
        return_metadata = kwargs.pop("return_lora_metadata", False)
        source = pretrained_model_name_or_path_or_dict
        if isinstance(source, dict):
            state, metadata = dict(source), kwargs.pop("metadata", None)
        elif is_adapter_folder(source):
            state, metadata = read_lora_folder(source)
        elif os.path.isdir(source) and not any(name.endswith(".safetensors") for name in os.listdir(source)):
            raise ValueError(
                f"{source} holds no LoRA weights: expected a fusedit adapter folder (adapter_config.json and "
                f"adapter_model.safetensors, e.g. a LoRA run's final/adapter) or a diffusers LoRA .safetensors file"
            )
        else:
            state, metadata = _fetch_state_dict(
                pretrained_model_name_or_path_or_dict=source,
                weight_name=kwargs.pop("weight_name", None),
                use_safetensors=kwargs.pop("use_safetensors", True),
                local_files_only=kwargs.pop("local_files_only", None),
                cache_dir=kwargs.pop("cache_dir", None),
                force_download=kwargs.pop("force_download", False),
                proxies=kwargs.pop("proxies", None),
                token=kwargs.pop("token", None),
                revision=kwargs.pop("revision", None),
                subfolder=kwargs.pop("subfolder", None),
                user_agent={"file_type": "attn_procs_weights", "framework": "pytorch"},
                allow_pickle=False,
            )
        return (state, metadata) if return_metadata else state

    def load_lora_weights(  # type: ignore[override]
        self, pretrained_model_name_or_path_or_dict: Any, adapter_name: str | None = None, **kwargs: Any
    ) -> None:
        """Load LoRA adapters into the transformer (and the LLM, when the adapters have a ``text_encoder`` part)
        under ``adapter_name`` (default: diffusers' next free ``default_N``)."""
        source = pretrained_model_name_or_path_or_dict
        low_cpu_mem_usage = kwargs.pop("low_cpu_mem_usage", False)
        hotswap = kwargs.pop("hotswap", False)
        state, metadata = self.lora_state_dict(source, return_lora_metadata=True, **kwargs)
        if not state or not all("lora" in key for key in state):
            raise ValueError(f"{pretrained_model_name_or_path_or_dict!r}: not a LoRA state dict (keys without 'lora')")
        known = (f"{TRANSFORMER}.", f"{TEXT_ENCODER}.")
        if not all(key.startswith(known) for key in state):
            raise ValueError(
                f"{pretrained_model_name_or_path_or_dict!r}: LoRA keys must start with 'transformer.' or "
                f"'text_encoder.' (diffusers' naming) or come from a fusedit adapter folder"
            )
        check_fits(state, {TRANSFORMER: self.transformer, TEXT_ENCODER: self.text_encoder})
        adapter_name = adapter_name or get_adapter_name(self.transformer)
        self.transformer.load_lora_adapter(
            {k: v for k, v in state.items() if k.startswith(f"{TRANSFORMER}.")},
            prefix=TRANSFORMER,
            adapter_name=adapter_name,
            metadata=metadata,
            _pipeline=self,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hotswap=hotswap,
        )
        if any(key.startswith(f"{TEXT_ENCODER}.") for key in state):
            _load_lora_into_text_encoder(
                state,
                network_alphas=None,
                text_encoder=self.text_encoder,
                prefix=TEXT_ENCODER,
                adapter_name=adapter_name,
                _pipeline=self,
                low_cpu_mem_usage=low_cpu_mem_usage,
                metadata=metadata,
            )
        self._adapters_changed()

    def fuse_lora(
        self,
        components: list[str] | None = None,
        lora_scale: float = 1.0,
        safe_fusing: bool = False,
        adapter_names: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """Merge the active adapters (or ``adapter_names``) into the weights of ``components`` (default: the
        transformer and the LLM), scaled by ``lora_scale``."""
        components = components or list(self._lora_loadable_modules)
        super().fuse_lora(components, lora_scale, safe_fusing, adapter_names, **kwargs)
        self._adapters_changed()

    def unfuse_lora(self, components: list[str] | None = None, **kwargs: Any) -> None:
        super().unfuse_lora(components=components or list(self._lora_loadable_modules), **kwargs)
        self._adapters_changed()

    def set_adapters(self, adapter_names: Any, adapter_weights: Any = None) -> None:
        super().set_adapters(adapter_names, adapter_weights)
        self._adapters_changed()

    def unload_lora_weights(self) -> None:
        super().unload_lora_weights()
        self._adapters_changed()

    def delete_adapters(self, adapter_names: Any) -> None:
        super().delete_adapters(adapter_names)
        self._adapters_changed()

    def disable_lora(self) -> None:
        super().disable_lora()
        self._adapters_changed()

    def enable_lora(self) -> None:
        super().enable_lora()
        self._adapters_changed()

    def _adapters_changed(self) -> None:
        """Called after every change of the adapters (the pipeline drops its cached text contexts)."""
