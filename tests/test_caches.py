"""Model and tokenizer caches are shared by every run on a machine, often started together."""
import os

import pytest

from models import build_tiny_tokenizer
from utils import cache_directory


def test_a_cache_built_by_two_processes_at_once_keeps_the_first_and_leaves_no_temporaries(tmp_path):
    target = str(tmp_path / "models" / "m")
    with cache_directory(target) as mine:
        with open(os.path.join(mine, "config.json"), "w") as f:
            f.write("mine")
        # the other process finishes first and publishes its own copy
        with cache_directory(target) as theirs:
            with open(os.path.join(theirs, "config.json"), "w") as f:
                f.write("theirs")
    assert open(os.path.join(target, "config.json")).read() == "theirs"
    assert os.listdir(tmp_path / "models") == ["m"]


def test_a_cache_build_that_fails_publishes_nothing(tmp_path):
    target = str(tmp_path / "models" / "m")
    with pytest.raises(RuntimeError):
        with cache_directory(target) as tmp:
            open(os.path.join(tmp, "config.json"), "w").close()
            raise RuntimeError("conversion failed")
    assert os.listdir(tmp_path / "models") == []


def test_tiny_tokenizer_cache_is_reused_and_readable(tmp_path):
    texts = ["the quick brown fox", "jumps over the lazy dog"] * 20
    first = build_tiny_tokenizer(texts, 300, str(tmp_path))
    second = build_tiny_tokenizer(list(reversed(texts)), 300, str(tmp_path))
    assert first.encode("the lazy fox") == second.encode("the lazy fox")
    assert len(os.listdir(tmp_path / "tokenizers")) == 1
