"""Training: pretraining now; SFT, DPO, reward models and GRPO build on the same pieces.

optim.py (AdamW groups, schedules), losses.py (pure loss functions), loop.py (the shared
optimizer step, spike guard, signals, throughput), parallel.py (DDP / FSDP2 / activation
checkpointing / compile), checkpointing.py (atomic, resumable checkpoints), data.py (the
loader protocol), config.py + pretrain.py (the pretraining run), metrics.py (jsonl + plots).
Nothing is imported here, so importing a submodule stays cheap.
"""
