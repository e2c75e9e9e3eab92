"""Shared fixtures: a tiny randomly initialised policy with the toy tokenizer (no pre-training needed)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import toy  # noqa: E402
from common.models import Policy  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    tok = toy.build_tokenizer()
    tok.padding_side = "left"
    return tok


@pytest.fixture()
def policy(tokenizer):
    torch.manual_seed(0)
    lm = toy.build_model(tokenizer, seed=0)
    lm.config._attn_implementation = "sdpa"
    return Policy(lm).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A randomly initialised toy-architecture model saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("tiny-model")
    toy.build_model(tokenizer, seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


SLOW_FILES = {"test_learning.py"}
"""Test files whose every test is marked `slow`: full 60-step trainings (most of the suite's time)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full training runs (tests/test_learning.py, most of the suite's time "
                                       "on 2 CPU cores); deselect with -m \"not slow\"")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
