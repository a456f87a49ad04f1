"""Shared fixtures: tiny models/tokenizers, example files, and (below) service fixtures."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from tiny import arithmetic_rows, tiny_model, tiny_tokenizer  # noqa: E402


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture()
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny model + tokenizer saved like any HF model directory (for --model DIR)."""
    d = tmp_path_factory.mktemp("tiny-model")
    tiny_model().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture()
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", arithmetic_rows(24, seed=1))


@pytest.fixture()
def eval_file(tmp_path):
    return write_jsonl(tmp_path / "eval.jsonl", arithmetic_rows(6, seed=2))
