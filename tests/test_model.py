"""Model presets: shapes as documented, refusals of unknown names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from worker.model import ModelError, build_model, count_parameters, model_config, model_signature


def params_on_meta(preset: str) -> int:
    with torch.device("meta"):
        return count_parameters(LlamaForCausalLM(model_config(preset)))


def test_tiny_is_small_and_deterministic() -> None:
    a, b = build_model("tiny", seed=1, vocab_min=259), build_model("tiny", seed=1, vocab_min=259)
    assert count_parameters(a) < 5_000_000
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert model_signature(a) == model_signature(b)


def test_presets_have_their_documented_sizes() -> None:
    assert 150e6 < params_on_meta("150m") < 200e6
    assert 1.1e9 < params_on_meta("1b") < 1.4e9
    config = model_config("10b")
    shape = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
             config.num_key_value_heads, config.intermediate_size, config.vocab_size)
    assert shape == (4096, 42, 32, 8, 14336, 128256)
    assert 9.5e9 < params_on_meta("10b") < 10.5e9


def test_unknown_preset_names_the_choices() -> None:
    with pytest.raises(ModelError, match="unknown model 'huge': use one of tiny, 150m, 1b, 10b"):
        model_config("huge")


def test_config_directory(tmp_path: Path) -> None:
    model_config("tiny").save_pretrained(tmp_path)
    model = build_model(str(tmp_path), seed=0, vocab_min=259)
    assert model_signature(model) == model_signature(build_model("tiny", seed=0, vocab_min=259))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="has no config.json"):
        model_config(str(tmp_path / "empty"))
