"""The whole configuration of a run: model, text side, data, training and sampling."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from fusedit.config import load_config, require
from fusedit.data.buckets import check_bucket_config
from fusedit.data.config import DataConfig
from fusedit.finetune.config import FinetuneConfig
from fusedit.models.config import ModelConfig
from fusedit.text.config import TextConfig
from fusedit.train.config import TrainConfig


@dataclass
class SampleConfig:
    """Default sampling settings of a trained model (the pipeline's defaults).

    Attributes:
        num_inference_steps: Euler steps of the flow-match scheduler.
        guidance_scale: classifier-free guidance scale (1 = no guidance).
        negative_prompt: the unconditional prompt.
        shift: shift of the flow-match schedule.
        guidance_interval: ``[σ_low, σ_high]``: guidance applies only at steps whose noise level σ (1 = pure
            noise) lies in this closed interval; the other steps use the conditional prediction alone
            (Kynkäänniemi et al., 2024, "Applying Guidance in a Limited Interval"). ``null``: every step (the
            reference's sampler).
    """

    num_inference_steps: int = 25
    guidance_scale: float = 6.0
    negative_prompt: str = ""
    shift: float = 3.0
    guidance_interval: list[float] | None = None

    def validate(self) -> None:
        require(
            self.num_inference_steps > 0, f"sample.num_inference_steps: got {self.num_inference_steps}, expected > 0"
        )
        require(
            self.guidance_scale >= 1,
            f"sample.guidance_scale: got {self.guidance_scale}, expected >= 1 (1 = no guidance)",
        )
        require(self.shift > 0, f"sample.shift: got {self.shift}, expected > 0")
        if self.guidance_interval is not None:
            problem = guidance_interval_problem(self.guidance_interval)
            require(problem is None, f"sample.guidance_interval: {problem}")


def guidance_interval_problem(interval) -> str | None:
    """Why ``interval`` is not a valid ``[σ_low, σ_high]`` (``0 <= σ_low <= σ_high <= 1``), or None when it is."""
    if (
        not isinstance(interval, (list, tuple))
        or len(interval) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
    ):
        return f"got {interval!r}, expected [sigma_low, sigma_high], two numbers"
    low, high = interval
    if not 0.0 <= low <= high <= 1.0:
        return f"got {list(interval)!r}, expected 0 <= sigma_low <= sigma_high <= 1"
    return None


@dataclass
class ExperimentConfig:
    """Everything a run needs. Load with :func:`load_experiment` (YAML + ``base:`` + ``key=value`` overrides).

    Attributes:
        name: the run's name; ``fusedit train`` writes the run to ``runs/<name>`` unless ``--run-dir`` is given.
        model, text, data, train, sample: the sections (their keys are listed by ``fusedit configs --keys``).
    """

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        lora = self.finetune.lora
        require(
            lora is None or not (lora.llm_target_modules and self.text.trainable),
            "finetune.lora.llm_target_modules with text.trainable: true: train the LLM either whole or through "
            "adapters, not both",
        )
        require(
            self.train.llm_lr_scale == 1.0 or self.text.trainable or bool(lora and lora.llm_target_modules),
            f"train.llm_lr_scale={self.train.llm_lr_scale} scales the learning rate of a training LLM, but the LLM is "
            "frozen; set text.trainable: true (or LLM adapters), or leave train.llm_lr_scale at 1",
        )
        if self.data.vae is None:
            require(
                self.model.in_channels == 3,
                f"model.in_channels: training in pixel space (data.vae is null) needs in_channels=3, "
                f"got {self.model.in_channels}; set data.vae to a VAE or model.in_channels=3",
            )
        check_bucket_config(self)  # aspect-ratio buckets: whole patch grids the sin-cos table covers


def load_experiment(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load and validate an :class:`ExperimentConfig` from YAML plus ``key=value`` overrides."""
    return load_config(ExperimentConfig, path, overrides)
