"""Chat formatting and loss masks, checked against decoded text and transformers' own assistant mask."""

from __future__ import annotations

import pytest

from lorafit.data import (
    ChatTemplateError,
    Example,
    build_prompt_ids,
    tokenize_example,
    tokenize_examples,
)

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
MULTI_TURN = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Tell me a joke about cats."},
    {"role": "assistant", "content": "Cats sleep all day and judge you all night."},
]
WITH_SYSTEM = [
    {"role": "system", "content": "You write short poems."},
    {"role": "user", "content": "Write a short poem about the sea."},
    {"role": "assistant", "content": "The waves and the wind,\nthe sea."},
]
PADDED_REPLY = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": " How can I help you today?\n"},
]
CHATS = {"multi_turn": MULTI_TURN, "system_prompt": WITH_SYSTEM, "padded_reply": PADDED_REPLY}
# Same rendering as the SmolLM2 template, but marks assistant content + <|im_end|> for transformers' assistant mask.
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat(messages: list[dict]) -> Example:
    return Example(source="test.jsonl:1", messages=messages)


def target_runs(tokenizer, tokenized) -> list[str]:
    """Decode each maximal run of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


@pytest.mark.parametrize("messages", CHATS.values(), ids=CHATS.keys())
def test_targets_are_each_assistant_reply_and_its_end_token(chatml_tokenizer, messages):
    tokenized = tokenize_example(chatml_tokenizer, chat(messages))
    replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert target_runs(chatml_tokenizer, tokenized) == replies
    assert not tokenized.truncated


@pytest.mark.parametrize("messages", CHATS.values(), ids=CHATS.keys())
def test_matches_transformers_tokenization_and_generation_mask(make_tokenizer, chatml_tokenizer, messages):
    reference = make_tokenizer(GENERATION_TEMPLATE).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    tokenized = tokenize_example(chatml_tokenizer, chat(messages))
    assert tokenized.input_ids == list(reference["input_ids"])
    assert [label != -100 for label in tokenized.labels] == [bool(m) for m in reference["assistant_masks"]]


def test_rendered_text_round_trips(chatml_tokenizer):
    tokenized = tokenize_example(chatml_tokenizer, chat(MULTI_TURN))
    expected = SYSTEM + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in MULTI_TURN)
    assert chatml_tokenizer.decode(tokenized.input_ids) == expected


def test_all_tokens_trained_without_assistant_only(chatml_tokenizer):
    tokenized = tokenize_example(chatml_tokenizer, chat(MULTI_TURN), assistant_only=False)
    assert tokenized.labels == tokenized.input_ids
    assert tokenized.input_ids == tokenize_example(chatml_tokenizer, chat(MULTI_TURN)).input_ids


def test_truncation_keeps_the_start(chatml_tokenizer):
    full = tokenize_example(chatml_tokenizer, chat(MULTI_TURN))
    cut = tokenize_example(chatml_tokenizer, chat(MULTI_TURN), max_seq_len=len(full.input_ids) - 5)
    assert cut.truncated
    assert cut.input_ids == full.input_ids[:-5]
    assert cut.labels == full.labels[:-5]
    same = tokenize_example(chatml_tokenizer, chat(MULTI_TURN), max_seq_len=len(full.input_ids))
    assert not same.truncated and same.input_ids == full.input_ids


def test_all_masked_after_truncation_is_dropped_and_counted(chatml_tokenizer):
    short = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."}]
    long = [{"role": "user", "content": "Tell me a joke about cats. " * 5}, {"role": "assistant", "content": "No."}]
    short_full = tokenize_example(chatml_tokenizer, chat(short))
    max_seq_len = len(short_full.input_ids)
    assert len(build_prompt_ids(chatml_tokenizer, long)) > max_seq_len  # the long reply is cut off entirely
    examples = [chat(long), chat(short)]

    kept, stats = tokenize_examples(chatml_tokenizer, examples, max_seq_len=max_seq_len)

    assert kept == [short_full]
    assert (stats.examples, stats.truncated, stats.dropped) == (2, 1, 1)
    assert stats.total_tokens == len(short_full.input_ids)
    assert stats.target_tokens == len(chatml_tokenizer("Hi.<|im_end|>")["input_ids"])


def test_text_example_trains_every_token_and_ends_with_eos(chatml_tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    for given in (text, text + "<|im_end|>"):
        tokenized = tokenize_example(chatml_tokenizer, Example(source="t.jsonl:1", text=given))
        assert chatml_tokenizer.decode(tokenized.input_ids) == text + "<|im_end|>"
        assert tokenized.labels == tokenized.input_ids


def test_end_of_turn_token_other_than_eos_is_detected(make_tokenizer, smollm2_template):
    tokenizer = make_tokenizer(smollm2_template.replace("'<|im_end|>' + '\\n'", "'<|end|>' + '\\n'"))
    tokenized = tokenize_example(tokenizer, chat(MULTI_TURN))
    assert target_runs(tokenizer, tokenized) == [m["content"] + "<|end|>" for m in MULTI_TURN[1::2]]


def test_template_that_trims_content(make_tokenizer, smollm2_template):
    tokenizer = make_tokenizer(smollm2_template.replace("message['content']", "(message['content'] | trim)"))
    messages = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "  Hi there. \n"}]
    assert target_runs(tokenizer, tokenize_example(tokenizer, chat(messages))) == ["Hi there.<|im_end|>"]


def test_template_breaking_the_prefix_property_is_reported(make_tokenizer, smollm2_template):
    tokenizer = make_tokenizer(smollm2_template.replace("'<|im_start|>assistant\\n'", "'<|im_start|>bot\\n'"))
    with pytest.raises(ChatTemplateError, match="test.jsonl:1"):
        tokenize_example(tokenizer, chat(MULTI_TURN))


def test_template_that_rewrites_content_is_reported(make_tokenizer, smollm2_template):
    tokenizer = make_tokenizer(smollm2_template.replace("message['content']", "(message['content'] | upper)"))
    with pytest.raises(ChatTemplateError, match="right after the generation prompt"):
        tokenize_example(tokenizer, chat(MULTI_TURN))


def test_build_prompt_ids_ends_with_generation_prompt(chatml_tokenizer):
    expected = SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    for messages in (MULTI_TURN[:1], MULTI_TURN[:2]):
        assert chatml_tokenizer.decode(build_prompt_ids(chatml_tokenizer, messages)) == expected


@pytest.mark.slow
def test_real_smollm2_tokenizer_masks(smollm2):
    """On SmolLM2's own template, the trained tokens decode exactly to each reply plus <|im_end|>."""
    _, tokenizer = smollm2
    for messages in CHATS.values():
        tokenized = tokenize_example(tokenizer, chat(messages))
        replies = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
        assert target_runs(tokenizer, tokenized) == replies
        reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)
        assert tokenized.input_ids == list(reference["input_ids"])


@pytest.mark.parametrize("count, shown", [(2000, False), (2001, True)])
def test_progress_bar_only_for_large_datasets(chatml_tokenizer, monkeypatch, count, shown):
    import lorafit.data.chat as chat_module

    calls = []

    def fake_tqdm(items, **kwargs):
        calls.append(kwargs["disable"])
        return items

    monkeypatch.setattr(chat_module, "tqdm", fake_tqdm)
    kept, stats = tokenize_examples(chatml_tokenizer, [Example(source="t", text="Hi.")] * count)
    assert calls == [not shown]
    assert len(kept) == stats.examples == count
