"""Load SmolLM2-135M-Instruct, attach LoRA (all-linear, r=16), report parameters, answer a chat prompt, save.

Run: python examples/quickstart_lora.py [--out runs/quickstart_adapter]
"""

from __future__ import annotations

import argparse
import time

import torch

import lorafit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="runs/quickstart_adapter", help="folder for the saved adapter")
    args = parser.parse_args()

    start = time.perf_counter()
    model, tokenizer = lorafit.load_model("smollm2-135m")
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - start:.1f}s")

    lorafit.attach(model, lorafit.AdapterConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear"))
    print(lorafit.parameter_report(model))

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch.to(model.device), max_new_tokens=24, do_sample=False)
    print("answer:", tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))

    path = lorafit.save_adapter(model, args.out, base_model_name_or_path="smollm2-135m")
    print(f"adapter saved to {path}/ (adapter_config.json + adapter_model.safetensors, PEFT format)")


if __name__ == "__main__":
    main()
