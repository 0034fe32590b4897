"""The tiny chat model saved as a folder with a random adapter, for the CLI tests."""

from __future__ import annotations

import pytest
from tiny_chat import tiny_chat_model, with_random_adapter

from lorafit.adapters.io import save_adapter


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """(model folder, adapter folder): the tiny model and a random all-linear r=4 adapter saved for it."""
    root = tmp_path_factory.mktemp("tiny_eval")
    model, tokenizer = tiny_chat_model()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    save_adapter(with_random_adapter(model, scale=0.5), root / "adapter")
    return root / "model", root / "adapter"
