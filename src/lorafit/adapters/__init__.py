"""Adapters: LoRA layers, target selection, attach / merge / unload, PEFT-format save and load."""
