"""The whole configuration of a run: model, text side, data, training and sampling."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence, Union

from fusedit.config import load_config, require
from fusedit.data.config import DataConfig
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
    """

    num_inference_steps: int = 25
    guidance_scale: float = 6.0
    negative_prompt: str = ""
    shift: float = 3.0

    def validate(self) -> None:
        require(self.num_inference_steps > 0, f"sample.num_inference_steps: got {self.num_inference_steps}, expected > 0")
        require(self.guidance_scale >= 0, f"sample.guidance_scale: got {self.guidance_scale}, expected >= 0")
        require(self.shift > 0, f"sample.shift: got {self.shift}, expected > 0")


@dataclass
class ExperimentConfig:
    """Everything a run needs. Load with :func:`load_experiment` (YAML + ``base:`` + ``key=value`` overrides)."""

    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> None:
        if self.data.vae is None:
            require(self.model.in_channels == 3,
                    f"model.in_channels: training in pixel space (data.vae is null) needs in_channels=3, "
                    f"got {self.model.in_channels}; set data.vae to a VAE or model.in_channels=3")


def load_experiment(path: Union[str, os.PathLike, None] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Load and validate an :class:`ExperimentConfig` from YAML plus ``key=value`` overrides."""
    return load_config(ExperimentConfig, path, overrides)
