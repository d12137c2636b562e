"""Fine-tuning a trained model on your own data: the starting weights (``finetune.init_from``: a run, an exported
pipeline folder or a reference folder), LoRA adapters through ``peft`` on the DiT (and optionally the LLM), and the
adapters saved alone in peft's format. See ``docs/finetune.md``.

Modules: :mod:`~fusedit.finetune.config` (the ``finetune:`` section), :mod:`~fusedit.finetune.lora` (targets,
injection, names), :mod:`~fusedit.finetune.init` (starting weights), :mod:`~fusedit.finetune.adapters` (adapter
folders), :mod:`~fusedit.finetune.setup` (what training and loading do with the section). Nothing is imported here,
so that the config module stays importable without peft's dependencies being loaded.
"""
