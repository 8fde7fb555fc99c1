"""`--init-from DIR`: a run starts from a pretrained Hugging Face model, architecture and tokenizer included.

Real workers on loopback, started from model directories the test writes with save_pretrained (no
download): two from the same directory average and agree; a third from other weights is refused at
join, in one line, before it trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoints import param_sha256
from tests.helpers import events, run_worker, start_worker, stop, wait_for
from tests.test_swarm import SWARM, join_args
from worker.data import embedded_corpus_files


def save_model_dir(path: Path, *, seed: int) -> Path:
    """A small Llama with a BPE tokenizer of its own, as `save_pretrained` writes them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=384, max_position_embeddings=256)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [p.read_text(errors="replace")[:4000] for p in embedded_corpus_files()[:40]]
    tok.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>").save_pretrained(path)
    return path


def initial_hash(path: Path) -> str:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return param_sha256(dict(model.named_parameters()))


@pytest.mark.slow
def test_workers_from_one_model_dir_average_and_others_are_refused(tmp_path: Path, procs: list) -> None:
    pretrained = save_model_dir(tmp_path / "pretrained", seed=1)
    other = save_model_dir(tmp_path / "other", seed=2)
    a, b = tmp_path / "a", tmp_path / "b"
    # No --max-epochs: they train until stopped, so that they are surely live when the third one joins.
    args = [*SWARM, "--init-from", str(pretrained), "--min-peers", "2"]
    procs.append(start_worker(a, *args))
    procs.append(start_worker(b, *args, *join_args(a)))
    # Both live and training: a third peer now finds the run's records when it joins.
    wait_for(lambda: events(a, "inner_step") and events(b, "inner_step"), timeout=120,
             what="both workers to train")
    refused = run_worker(tmp_path / "c", *SWARM, "--init-from", str(other), *join_args(a), timeout=120)
    assert refused.returncode == 2, refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert "other initial weights" in lines[-1] and str(other) in lines[-1], refused.stderr
    assert not events(tmp_path / "c", "inner_step"), "the refused peer must not train"

    wait_for(lambda: len(events(a, "outer_step")) >= 3 and len(events(b, "outer_step")) >= 3, timeout=180,
             what="three rounds on both")
    for proc in procs:
        assert stop(proc) == 0
    # The run is the pretrained model's: its architecture, its tokenizer, its weights as theta_g at epoch 0.
    about = json.loads((a / "run.json").read_text())
    assert about["model"] == str(pretrained) and about["tokenizer"] == str(pretrained)
    assert about["origin"] == initial_hash(pretrained) == json.loads((b / "run.json").read_text())["origin"]
    # The two average every round and agree bit for bit.
    rounds = {d.name: {r["epoch"]: (r["group_size"], r["param_sha256"]) for r in events(d, "outer_step")}
              for d in (a, b)}
    together = [e for e in set(rounds["a"]) & set(rounds["b"]) if rounds["a"][e][0] == 2]
    assert len(together) >= 3 and all(rounds["a"][e] == rounds["b"][e] for e in together), rounds
    # Each round, one member of the group (not both) evaluated the new theta_g.
    evals = [r["epoch"] for d in (a, b) for r in events(d, "eval")]
    assert all(evals.count(e) == 1 for e in together), (evals, rounds)
