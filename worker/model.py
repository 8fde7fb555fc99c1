"""Model presets (Llama-3 architecture at several sizes) and how a model is built.

Every peer of a run must build the same parameter names and shapes: the
``model_signature`` of a model is what a run dir and a peer's state are checked
against before anything is loaded into it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel

from worker.console import one_line
from worker.errors import WorkerError

# Llama-3's tokenizer; the byte tokenizer fits in any vocabulary of at least 259.
LLAMA3_VOCAB = 128256

PRESETS: dict[str, dict[str, int | float | bool]] = {
    # CPU tests and the local demo swarm: 0.45M parameters.
    "tiny": dict(
        hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=320, max_position_embeddings=1024,
    ),
    # 174M with tied embeddings (Llama-3 vocabulary makes half of it embeddings).
    "150m": dict(
        hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, vocab_size=LLAMA3_VOCAB, max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    # Llama-3.2-1B's shape: 1.24B.
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=LLAMA3_VOCAB, max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
    # INTELLECT-1's shape: 10.2B.
    "10b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=LLAMA3_VOCAB, max_position_embeddings=8192,
    ),
}


class ModelError(WorkerError):
    """A model preset or config directory that cannot be used; one-line message."""


def model_config(preset: str) -> PretrainedConfig:
    """The transformers config of a preset name or a Hugging Face config directory."""
    if preset in PRESETS:
        settings = {"tie_word_embeddings": False, "rope_theta": 500_000.0, **PRESETS[preset]}
        return LlamaConfig(**settings)
    path = Path(preset)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json")
        try:
            return AutoConfig.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises many types for bad configs
            raise ModelError(f"cannot read model config in {path}: {one_line(e)}") from None
    allowed = ", ".join(PRESETS)
    raise ModelError(f"unknown model {preset!r}: use one of {allowed} "
                     "or a directory holding a Hugging Face config.json")


def build_model(preset: str, *, seed: int, vocab_min: int, init_from: Path | None = None) -> PreTrainedModel:
    """A causal LM in fp32: freshly initialised (identical on every peer for the same seed), or, with
    `init_from`, the pretrained weights of that Hugging Face model directory (whose config then is the
    architecture: `preset` is ignored)."""
    if init_from is not None:
        return _load_pretrained(init_from, vocab_min=vocab_min)
    config = model_config(preset)
    if config.vocab_size < vocab_min:
        raise ModelError(f"model {preset!r} has a vocabulary of {config.vocab_size} "
                         f"but the tokenizer needs {vocab_min}")
    torch.manual_seed(seed)
    if isinstance(config, LlamaConfig):
        model = LlamaForCausalLM(config)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config)
    return model.float()


def _load_pretrained(path: Path, *, vocab_min: int) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    config = model_config(str(path))  # one-line errors for a missing or unreadable config.json
    if not any(path.glob("*.safetensors")):
        raise ModelError(f"--init-from {path} has no .safetensors weights: save the model with "
                         "save_pretrained(..., safe_serialization=True)")
    if config.vocab_size < vocab_min:
        raise ModelError(f"--init-from {path} has a vocabulary of {config.vocab_size} "
                         f"but the tokenizer needs {vocab_min}")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch.float32,
                                                     use_safetensors=True)
    except Exception as e:  # transformers raises many types for bad or partial weights
        raise ModelError(f"cannot load the weights in {path}: {one_line(e)}") from None
    return model.float()


def model_signature(model: torch.nn.Module) -> str:
    """A short hash of the parameter names, shapes and dtypes (not values)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(f"{name}:{tuple(param.shape)}:{param.dtype};".encode())
    return digest.hexdigest()[:16]


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
