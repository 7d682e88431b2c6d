"""Fixtures shared by the test files: the project's root on sys.path, a tiny random model with the built-in
tokenizer saved as a Hugging Face directory."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A 2-layer random model with the built-in tokenizer's vocabulary, saved in the Hugging Face layout."""
    from test_grpo import tiny_model

    try:
        from builtin import resolve_model_path
        from model import load_tokenizer

        tok = load_tokenizer(resolve_model_path("builtin"))
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"built-in tokenizer unavailable ({e}); run `make setup`")
    model = tiny_model(vocab=len(tok), seed=5)
    path = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(path, tokenizer=tok)
    return path
