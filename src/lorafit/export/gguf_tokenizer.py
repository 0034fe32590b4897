"""The tokenizer.* keys of a GGUF: copied from the model's own GGUF when it came from one, else built from a
Hugging Face byte-level BPE tokenizer the way llama.cpp's convert_hf_to_gguf.py (`_set_vocab_gpt2`) does."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import gguf
from gguf import GGUFReader
from transformers import PreTrainedTokenizerBase

from lorafit.config import LorafitWarning
from lorafit.errors import UserError
from lorafit.models.zoo import KNOWN_MODELS, fetch_gguf

TOKENIZER_PREFIX = "tokenizer."
TOKENS_KEY = "tokenizer.ggml.tokens"


def source_gguf(name_or_path: str) -> Path | None:
    """The GGUF file a model was loaded from (a short name's cached file or a .gguf path), or None."""
    if name_or_path in KNOWN_MODELS:
        return fetch_gguf(name_or_path)
    path = Path(name_or_path)
    return path if path.suffix == ".gguf" and path.is_file() else None


def add_tokenizer_from_gguf(writer: gguf.GGUFWriter, source: Path, vocab_size: int) -> None:
    """Copy every tokenizer.* key (vocabulary, merges, special ids, pre-tokenizer, chat template) verbatim."""
    reader = GGUFReader(source)
    fields = {name: field for name, field in reader.fields.items() if name.startswith(TOKENIZER_PREFIX)}
    if TOKENS_KEY not in fields:
        raise UserError(f"{source} has no {TOKENS_KEY}; export from the Hugging Face folder of the model instead.")
    count = len(fields[TOKENS_KEY].contents())
    if count != vocab_size:
        raise UserError(f"{source} lists {count} tokens but the model has {vocab_size} embedding rows; "
                         "the GGUF is not this model's source.")
    for name, field in fields.items():
        main = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), main, sub_type=sub)


def add_tokenizer_from_hf(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocab_size: int) -> None:
    """gpt2-style keys from a fast byte-level BPE tokenizer: tokens (padded to the embedding rows with
    [PAD<i>] unused tokens, as llama.cpp does), token types, merges, special ids, add_bos, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    if spec.get("model", {}).get("type") != "BPE" or spec["model"].get("byte_fallback"):
        raise UserError("GGUF export writes byte-level BPE (gpt2-style) tokenizers only; this tokenizer is "
                         f"{spec.get('model', {}).get('type', type(tokenizer).__name__)} (SentencePiece needs tokenizer.model).")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size or max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has {len(by_id)} tokens (max id {max(by_id)}) but the model only "
                         f"{vocab_size} embedding rows; they do not belong together.")
    added = {index: token.special for index, token in tokenizer.added_tokens_decoder.items()}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL if index not in added else
                         gguf.TokenType.CONTROL if added[index] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id), (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(bool(probe) and tokenizer.bos_token_id is not None and probe[0] == tokenizer.bos_token_id)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)


# llama.cpp pre-tokenizer names for the splits we can recognise from tokenizer.json
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")


def _pre_tokenizer_name(pre: dict | None) -> str:
    """tokenizer.ggml.pre: how llama.cpp splits text before BPE. Unknown splits get "default" with a warning."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split":
        regex = steps[0].get("pattern", {}).get("Regex")
        if regex == _QWEN2_SPLIT:
            return "qwen2"
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
    warnings.warn(f"the tokenizer's pre-tokenizer {kinds} is not one lorafit recognises; tokenizer.ggml.pre is set to "
                  "'default', so llama.cpp may split some text differently from transformers.", LorafitWarning, stacklevel=3)
    return "default"
