"""The Ollama Modelfile: ChatML templates become the Go template, default system prompt and stop token."""

from __future__ import annotations

import pytest
from tiny_models import tiny_chat_tokenizer

from lorafit.export.ollama import CHATML_GO_TEMPLATE, chatml, chatml_default_system, modelfile_text, write_modelfile

QWEN2_LIKE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'"
              " + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
PLAIN = "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


@pytest.mark.parametrize("chat", CHATS)
def test_chatml_renders_like_the_hugging_face_template(chat):
    """What the Go template produces (ChatML of the messages, after Ollama adds SYSTEM when there is none) equals
    what transformers renders from SmolLM2's Jinja template."""
    tokenizer = tiny_chat_tokenizer()
    _, system = chatml_default_system(tokenizer)
    with_system = chat if chat[0]["role"] == "system" else [{"role": "system", "content": system}, *chat]
    assert chatml(with_system) == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_smollm2_template_gives_chatml_with_its_default_system_prompt(tmp_path):
    tokenizer = tiny_chat_tokenizer()
    path = write_modelfile(tmp_path / "model.gguf", tokenizer)
    assert path == tmp_path / "Modelfile"
    text = path.read_text()
    assert text.splitlines()[0] == "FROM ./model.gguf"
    assert f'TEMPLATE """{CHATML_GO_TEMPLATE}"""' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.count("PARAMETER stop") == 1 and 'PARAMETER stop "<|im_end|>"' in text


def test_chatml_without_default_system_has_no_system_line():
    text = modelfile_text("m.gguf", tiny_chat_tokenizer(QWEN2_LIKE))
    assert "TEMPLATE \"\"\"" in text and "SYSTEM" not in text


def test_other_templates_get_no_template_and_the_eos_stop():
    text = modelfile_text("m.gguf", tiny_chat_tokenizer(PLAIN))
    assert "TEMPLATE \"\"\"" not in text and "# no TEMPLATE" in text
    assert 'PARAMETER stop "<|im_end|>"' in text  # the tokenizer's eos
    assert chatml_default_system(tiny_chat_tokenizer(PLAIN)) == (False, None)
