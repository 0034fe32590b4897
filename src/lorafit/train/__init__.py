"""Training: the SFT and GRPO recipes over a shared loop (loop.py: RunState), loss, schedule, checkpoint contents."""
