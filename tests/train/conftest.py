"""A tiny model saved as a folder, with chat data and a run YAML, for trainer and CLI tests."""

from __future__ import annotations

import pytest
from tiny_models import write_tiny_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny Llama + ChatML tokenizer saved as a model folder, train/eval files and a run YAML."""
    return write_tiny_run(tmp_path_factory.mktemp("tiny_run"))
