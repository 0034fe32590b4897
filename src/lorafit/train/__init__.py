"""Training: supervised fine-tuning loop, loss, schedule, checkpoints, metrics log."""
