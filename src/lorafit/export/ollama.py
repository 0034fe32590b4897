"""An Ollama Modelfile beside a GGUF export: FROM, the chat template in Go template syntax, default system
prompt and stop tokens (`ollama create NAME -f Modelfile`).

The Hugging Face chat template (Jinja) is probed by rendering two chats; when it renders exactly as
ChatML (SmolLM2, Qwen2), the Modelfile gets the equivalent Go template, its default system prompt
as SYSTEM (Ollama adds it when a chat has none) and `<|im_end|>` as stop token. Other templates get
no TEMPLATE line: Ollama then derives one from the GGUF's tokenizer.chat_template when it knows it.
"""

from __future__ import annotations

import re
from pathlib import Path

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from lorafit.fileio import write_text_atomic

MODELFILE_NAME = "Modelfile"
CHATML_END = "<|im_end|>"
CHATML_GO_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n"
    "{{ .Content }}<|im_end|>\n"
    "{{ end }}<|im_start|>assistant\n"
)
_PROBE_CHAT = [
    {"role": "system", "content": "S1"},
    {"role": "user", "content": "U1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "U2"},
]
_DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system\n(.*?)<\|im_end\|>\n", re.DOTALL)


def chatml(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """A chat in ChatML, the format the Go template above produces."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def chatml_default_system(tokenizer: PreTrainedTokenizerBase) -> tuple[bool, str | None]:
    """(the tokenizer's chat template renders as ChatML, the system prompt it adds when a chat has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return False, None
    render = lambda chat: tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)  # noqa: E731
    try:
        full, user_only = render(_PROBE_CHAT), render(_PROBE_CHAT[1:2])
    except (TemplateError, ValueError, KeyError, TypeError):  # needs other roles or fields: not ChatML
        return False, None
    if full != chatml(_PROBE_CHAT):
        return False, None
    tail = chatml(_PROBE_CHAT[1:2])
    if not user_only.endswith(tail):
        return False, None
    head = user_only[: -len(tail)]
    if not head:
        return True, None
    match = _DEFAULT_SYSTEM.fullmatch(head)
    return (True, match.group(1)) if match else (False, None)


def modelfile_text(gguf_file: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The Modelfile for a GGUF file in the same folder (see the module docstring)."""
    lines = [f"FROM ./{gguf_file}"]
    is_chatml, system = chatml_default_system(tokenizer)
    stops = [CHATML_END] if is_chatml else []
    if is_chatml:
        lines.append(f'TEMPLATE """{CHATML_GO_TEMPLATE}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    else:
        lines.append("# no TEMPLATE: the chat template is not ChatML; Ollama derives one from the GGUF's "
                     "tokenizer.chat_template when it recognises it")
    eos = getattr(tokenizer, "eos_token", None)
    if eos and eos not in stops:
        stops.append(eos)
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path, tokenizer: PreTrainedTokenizerBase) -> Path:
    """Write `Modelfile` beside `gguf_path` (atomically) and return its path."""
    gguf_path = Path(gguf_path)
    target = gguf_path.parent / MODELFILE_NAME
    write_text_atomic(target, modelfile_text(gguf_path.name, tokenizer))
    return target
