"""Memory of one training step, estimated before training from the configs alone.

Where the bytes are (per process, on the training device):

* **weights**: the DiT's parameters and buffers in float32 (master weights), the frozen LLM's in ``text.dtype``
  (``int8``: one byte per linear weight plus a float32 scale per output row; embeddings and norms stay), counted
  exactly by building both models on the ``meta`` device (no memory, no download). ``fsdp`` divides the DiT's
  parameters, gradients and optimizer state by the world size; ``text.offload`` keeps the LLM off the device
  except while it encodes.
* **gradients**: float32, one per trained parameter (alive from the backward pass to the optimizer step).
* **optimizer state**: AdamW's two float32 moments (8 bytes per parameter); bitsandbytes' 8-bit AdamW: two bytes
  plus two float32 block scales per 256 elements for tensors of at least 4096 elements, 8 bytes for smaller ones;
  Muon (``muon``): one float32 momentum for each matrix it updates, AdamW's two moments for the other parameters.
  The step's temporaries: one float32 copy of all parameters for the multi-tensor (``foreach``) kernel, the default
  on CUDA; one of the largest tensor for the single-tensor loop, the default on CPU; Muon adds at most two float32
  copies of its matrices (their updates, then stacked by shape for the Newton–Schulz iteration).
* **activations** (:func:`block_activation_bytes`): what autograd saves in each DiT block, derived from the block's
  structure and counted per tensor: RMSNorm saves its input and normalised output in float32; each linear layer
  reading the normalised residual stream saves its own contiguous copy of its input (the residual stream is laid
  out ``(B, H, N)`` by the patch embedding, so every such linear copies), in the compute dtype; attention (SDPA,
  flash-style kernels: no ``N × M`` matrix) saves queries, ``[text ; image]`` keys and values, its output and a
  float32 log-sum-exp; the GeGLU MLP saves four ``(B, N, I)`` tensors. Under bf16 autocast every linear also keeps a
  bf16 copy of its weight. With activation checkpointing only each block's input is kept, plus one block's
  activations while it is recomputed.
* **text context**: the keys/values of every fused LLM layer for the batch, in the LLM's dtype, alive during the
  step; the LLM forward itself (no grad) holds one layer's working set at a time.

The peak is ``weights + optimizer state + max(LLM forward, DiT forward/backward, optimizer step)`` where the DiT
phase holds the context and the larger of all activations and all gradients (the backward pass frees the one as
it fills the other). Checked against measured CPU peaks in ``tools/memory_check.py`` (``docs/performance.md``,
"Memory estimate").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from fusedit.models.config import ResolvedModelConfig
from fusedit.models.dit import DiffusionTransformer
from fusedit.train.muon import uses_muon

FP32 = 4
MIN_8BIT_SIZE = 4096  # bitsandbytes' min_8bit_size: smaller tensors keep 32-bit state
BLOCK_SIZE = 256  # bitsandbytes' block-wise quantisation: one float32 absmax per block and state


@dataclass(frozen=True)
class MemorySettings:
    """What the estimate depends on besides the model.

    Attributes:
        batch: images per process and micro-batch.
        image_tokens: ``(latent side / patch)²``; ``latent_channels``, ``latent_size``: the DiT's input.
        text_keys: text key columns the DiT attends to (after trimming all-padding columns); ``llm_tokens``: the
            columns the LLM runs on (the same with ``text.trim``).
        precision: ``fp32`` or ``bf16`` (autocast with float32 master weights).
        optimizer: ``adamw``, ``adamw8bit`` or ``muon``; ``optimizer_kernel``: ``foreach`` (CUDA's default),
            ``single`` (CPU's) or ``fused``.
        activation_checkpointing: recompute each block in the backward pass.
        world_size, sharding: ``none``/``ddp`` (replicated) or ``fsdp`` (DiT parameters, gradients and optimizer
            state divided by ``world_size``).
        llm_bytes: bytes per LLM weight (4 fp32, 2 bf16); ``llm_int8``: 8-bit linear layers; ``llm_offload``: the LLM
            rests on the CPU (only counted while it encodes); ``device``: ``cpu`` or ``cuda`` (offload saves nothing
            on a CPU).
    """

    batch: int
    image_tokens: int
    latent_channels: int
    latent_size: int
    text_keys: int
    llm_tokens: int
    precision: str = "fp32"
    optimizer: str = "adamw"
    optimizer_kernel: str = "single"
    activation_checkpointing: bool = False
    world_size: int = 1
    sharding: str = "none"
    llm_bytes: int = FP32
    llm_int8: bool = False
    llm_offload: bool = False
    device: str = "cpu"

    @property
    def compute_bytes(self) -> int:
        return 2 if self.precision == "bf16" else FP32


@dataclass(frozen=True)
class ParameterCounts:
    """Element counts of a module: ``trainable`` parameters (``tensors``: their sizes), ``frozen`` parameters,
    ``buffers``, and ``linear`` weights (the part bf16 autocast copies and int8 quantises; ``linear_rows``: their
    output rows); ``muon``: the trainable elements ``train.optimizer=muon`` updates with Muon."""

    trainable: int
    frozen: int
    buffers: int
    linear: int
    linear_rows: int
    tensors: tuple[int, ...] = field(default=())
    muon: int = 0


def count_parameters(module: nn.Module) -> ParameterCounts:
    """Exact element counts of ``module`` (works on the ``meta`` device)."""
    trained = [p.numel() for p in module.parameters() if p.requires_grad]
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return ParameterCounts(
        trainable=sum(trained),
        frozen=sum(p.numel() for p in module.parameters() if not p.requires_grad),
        buffers=sum(b.numel() for b in module.buffers()),
        linear=sum(m.weight.numel() for m in linears),
        linear_rows=sum(m.weight.shape[0] for m in linears),
        tensors=tuple(trained),
        muon=sum(p.numel() for name, p in module.named_parameters() if p.requires_grad and uses_muon(name, p)),
    )


def dit_parameter_counts(resolved: ResolvedModelConfig) -> ParameterCounts:
    """The DiT's counts, from a model built on the ``meta`` device."""
    with torch.device("meta"):
        return count_parameters(DiffusionTransformer(resolved))


def llm_parameter_counts(hf_config, keep_layers: int) -> ParameterCounts:
    """The frozen LLM decoder's counts (embedding, the first ``keep_layers`` layers the text encoder keeps, final
    norm), from a Hugging Face config built on the ``meta`` device."""
    from transformers import AutoModel

    with torch.device("meta"):
        decoder = AutoModel.from_config(hf_config)
    decoder = getattr(decoder, "language_model", decoder)
    if 0 < keep_layers < len(decoder.layers):
        decoder.layers = decoder.layers[:keep_layers]
    decoder.requires_grad_(False)
    return count_parameters(decoder)


def optimizer_state_bytes(tensors: tuple[int, ...], optimizer: str, muon: int = 0) -> int:
    """Bytes of the optimizer's state for trained tensors of ``tensors`` elements each: AdamW's, bitsandbytes' for
    ``adamw8bit``, and for ``muon`` one moment for the ``muon`` elements Muon updates and two for the others."""
    if optimizer == "adamw":
        return 2 * FP32 * sum(tensors)
    if optimizer == "muon":
        return 2 * FP32 * sum(tensors) - FP32 * muon
    total = 0
    for n in tensors:
        if n >= MIN_8BIT_SIZE:
            total += 2 * n + 2 * FP32 * -(-n // BLOCK_SIZE) + 2 * FP32 * 256  # states, absmax, quantisation maps
        else:
            total += 2 * FP32 * n
    return total


def block_activation_bytes(resolved: ResolvedModelConfig, s: MemorySettings, fused: bool) -> int:
    """Bytes autograd saves in one DiT block (``fused``: it attends to text; see the module docstring)."""
    config, c = resolved.config, s.compute_bytes
    b, n, h = s.batch, s.image_tokens, resolved.hidden_size
    x = b * n * h
    q = b * n * resolved.num_attention_heads * resolved.head_dim
    k = b * n * resolved.num_key_value_heads * resolved.head_dim
    t = b * s.text_keys * resolved.num_key_value_heads * resolved.head_dim
    f = b * n * resolved.intermediate_size
    rows = b * n  # one float32 per row: RMSNorm's rsqrt
    cross = config.attention == "cross" and fused
    joint_text = t if (fused and not cross) else 0
    total = 2 * x * FP32 + rows * FP32  # input norm: input and normalised output (float32)
    total += 3 * x * c  # q/k/v copies of the normalised input
    if config.qk_norm:
        total += 2 * (q + k) * FP32 + (q + k) // resolved.head_dim * FP32
    total += (2 * q + 2 * (k + joint_text)) * c + b * resolved.num_attention_heads * n * FP32  # SDPA
    if cross:  # its query projection copies the residual stream, which nothing else then saves
        total += x * c + ((2 * q + q // resolved.head_dim) * FP32 if config.qk_norm else 0) + 2 * q * c + 2 * t * c
        total += b * resolved.num_attention_heads * n * FP32
        total += (2 * x + rows) * FP32 if config.sandwich_norm else 0
    if config.fusion == "shallow" and fused:
        total += 2 * t * FP32 if config.qk_norm else 0  # text keys through the block's key norm
    sandwich = 2 * (2 * x * FP32 + rows * FP32) if config.sandwich_norm else 0
    total += sandwich
    total += 2 * x * FP32 + rows * FP32 + 2 * x * c + 4 * f * c  # MLP norm (its input: the residual), gate/up, GeGLU
    if config.timestep_conditioning in ("adaln-zero", "adaln-single"):
        total += 4 * x * c  # modulated norm outputs and gated branches (compute dtype)
    if s.precision == "bf16" and config.pos_embed != "ape":
        total += 4 * b * n * resolved.head_dim * 2  # cos/sin cast to bf16 for q and k
    return total


def outer_activation_bytes(resolved: ResolvedModelConfig, s: MemorySettings) -> int:
    """Bytes saved outside the blocks: patch embedding, rotary tables, output head and loss."""
    b, n, h, c = s.batch, s.image_tokens, resolved.hidden_size, s.compute_bytes
    pixels = b * s.latent_channels * s.latent_size**2
    patch = pixels * c + b * n * h * FP32  # conv input, embedded tokens
    rope = 2 * b * n * resolved.head_dim * FP32 if resolved.config.pos_embed != "ape" else 0
    head = 2 * b * n * h * FP32 + b * n * h * c  # final norm, projection input
    loss = 5 * pixels * FP32  # x_t, prediction, target, difference, squared
    return patch + rope + head + loss


def text_context_bytes(resolved: ResolvedModelConfig, s: MemorySettings) -> int:
    """Keys and values of every fused LLM layer for the batch (shallow fusion: one hidden-state layer)."""
    width = s.llm_bytes if not s.llm_int8 else 2
    if resolved.config.fusion == "shallow":
        return s.batch * s.text_keys * resolved.llm.hidden_size * width
    per_layer = 2 * s.batch * s.text_keys * resolved.num_key_value_heads * resolved.head_dim
    return len(resolved.fused_llm_layers) * per_layer * width


def llm_forward_bytes(llm: ParameterCounts, geometry, s: MemorySettings) -> int:
    """Working set of the frozen LLM's forward (no grad: one layer at a time): the residual stream, q/k/v, eager
    attention scores (float32, twice), the MLP's three ``(B, L, I)`` tensors."""
    b, length, width = s.batch, s.llm_tokens, s.llm_bytes
    hidden = 3 * b * length * geometry.hidden_size * width
    qkv = b * length * (geometry.num_attention_heads + 2 * geometry.num_key_value_heads) * geometry.head_dim * width
    scores = 2 * b * geometry.num_attention_heads * length * length * FP32
    mlp = 3 * b * length * geometry.intermediate_size * width
    return hidden + qkv + scores + mlp


@dataclass
class MemoryEstimate:
    """``rows``: ``(component, bytes, how it is counted)``; ``peak``: the estimated peak in bytes; ``phase``: the
    phase of the step where it occurs."""

    rows: list[tuple[str, int, str]]
    peak: int
    phase: str

    def table(self) -> str:
        """A plain-text table of the components and the total."""
        width = max(len(name) for name, _, _ in self.rows) + 2
        lines = [f"{'component':<{width}}{'MiB':>10}  how", "-" * (width + 60)]
        lines += [f"{name:<{width}}{value / 2**20:>10.1f}  {how}" for name, value, how in self.rows]
        lines += ["-" * (width + 60), f"{'peak (' + self.phase + ')':<{width}}{self.peak / 2**20:>10.1f}"]
        return "\n".join(lines)


def _weights(dit: ParameterCounts, llm: ParameterCounts, s: MemorySettings) -> tuple[int, int]:
    """(DiT bytes on this process, LLM weight bytes)."""
    shard = s.world_size if s.sharding == "fsdp" else 1
    dit_bytes = (dit.trainable + dit.frozen) * FP32 // shard + dit.buffers * FP32
    llm_total = llm.trainable + llm.frozen
    if s.llm_int8:
        llm_bytes = llm.linear + llm.linear_rows * FP32 + (llm_total - llm.linear) * s.llm_bytes
    else:
        llm_bytes = llm_total * s.llm_bytes
    return dit_bytes, llm_bytes


def _activations(resolved: ResolvedModelConfig, s: MemorySettings) -> tuple[int, str]:
    blocks = [block_activation_bytes(resolved, s, fused=layer is not None) for layer in resolved.layer_map]
    outer = outer_activation_bytes(resolved, s)
    if s.activation_checkpointing:
        inputs = len(blocks) * s.batch * s.image_tokens * resolved.hidden_size * FP32
        how = f"checkpointed: {len(blocks)} block inputs + one block recomputed ({max(blocks) / 2**20:.1f} MiB)"
        return inputs + max(blocks) + outer, how
    return sum(blocks) + outer, f"{len(blocks)} blocks x {max(blocks) / 2**20:.1f} MiB + {outer / 2**20:.1f} outside"


def estimate_training_memory(
    resolved: ResolvedModelConfig, dit: ParameterCounts, llm: ParameterCounts, s: MemorySettings
) -> MemoryEstimate:
    """The components and the peak of one training step on one process (see the module docstring)."""
    shard = s.world_size if s.sharding == "fsdp" else 1
    dit_bytes, llm_bytes = _weights(dit, llm, s)
    offloaded = s.llm_offload and s.device != "cpu"
    grads = dit.trainable * FP32 // shard
    state = optimizer_state_bytes(dit.tensors, s.optimizer, dit.muon) // shard
    temp = {"foreach": grads, "fused": 0, "single": 2 * max(dit.tensors, default=0) * FP32}[s.optimizer_kernel]
    if s.optimizer == "adamw8bit":
        temp = max(dit.tensors, default=0) * FP32
    if s.optimizer == "muon":  # the Nesterov updates of every Muon matrix, then each shape's stack (bounded by them)
        temp += 2 * FP32 * dit.muon // shard
    activations, how = _activations(resolved, s)
    copies = dit.linear * 2 if s.precision == "bf16" else 0
    context = text_context_bytes(resolved, s)
    encoding = llm_forward_bytes(llm, resolved.llm, s)
    buckets = grads if (s.sharding == "ddp" and s.world_size > 1) else 0
    gathered = 2 * max(dit.tensors, default=0) * FP32 if shard > 1 else 0
    phases = {
        "LLM forward": (llm_bytes if offloaded else 0) + encoding + 2 * context,
        "DiT forward/backward": context + copies + gathered + max(activations, grads + buckets),
        "optimizer step": grads + buckets + temp,
    }
    phase = max(phases, key=lambda name: phases[name])
    resident = dit_bytes + (0 if offloaded else llm_bytes) + state
    kind = {"adamw8bit": "8-bit AdamW (bitsandbytes)", "muon": "Muon 1 x fp32 for layer matrices, AdamW 2 x fp32"}.get(
        s.optimizer, "AdamW, 2 x fp32"
    )
    llm_how = f"{(llm.trainable + llm.frozen) / 1e6:.2f} M" + (" int8 linears" if s.llm_int8 else "")
    rows = [
        ("DiT parameters + buffers", dit_bytes, f"{dit.trainable / 1e6:.2f} M trained, fp32" + _shard_note(shard)),
        ("LLM weights", llm_bytes, llm_how + (" (offloaded: on the device only while encoding)" if offloaded else "")),
        ("optimizer state", state, kind + _shard_note(shard)),
        ("gradients", grads, "fp32" + _shard_note(shard)),
        ("activations", activations, how + f", {s.precision}"),
        ("bf16 weight copies (autocast)", copies, "linear weights, while forward/backward run"),
        ("text context", context, f"K/V of {len(resolved.fused_llm_layers)} LLM layers x {s.text_keys} tokens"),
        ("LLM forward (transient)", encoding, f"{s.llm_tokens} tokens, one layer's working set"),
        ("optimizer step (transient)", temp, f"{s.optimizer_kernel} kernel temporaries"),
    ]
    if buckets:
        rows.append(("DDP gradient buckets", buckets, "a copy of the gradients"))
    return MemoryEstimate(rows=rows, peak=resident + phases[phase], phase=phase)


def _shard_note(shard: int) -> str:
    return f", / {shard} (fsdp)" if shard > 1 else ""
