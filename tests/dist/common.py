from fusedit.train.config import TrainConfig

from .workers import make_trainer

BASE = dict(batch_size=8, gradient_accumulation_steps=2, lr=1e-2, lr_schedule="constant", checkpoint_every=3,
            keep_checkpoints=3, ema_every=2, ema_decay=0.9, caption_dropout=0.3, log_every=1, seed=5,
            mixed_precision="no")


def single_process(run_dir, llm_dir, max_steps=6, **overrides):
    """An uninterrupted 1-process run (train.distributed=none) of the tests' settings."""
    cfg = TrainConfig(**{**BASE, "max_steps": max_steps, **overrides})
    trainer = make_trainer(cfg, run_dir, llm_dir)
    return trainer, trainer.fit()


def losses_of(result):
    return {int(k): v for k, v in result["losses"].items()}
