"""The byte tokenizer (worker.data.ByteTokenizer) as a Hugging Face tokenizer, for exported models.

An exported model must run with transformers alone, so its tokenizer is a plain ``tokenizer.json``
(the `tokenizers` library) rather than this project's class: a byte-level BPE with no merges whose
vocabulary puts byte b at id b, then BOS/EOS/PAD at 256/257/258, exactly as ByteTokenizer numbers
them. The model's vocabulary is usually larger than 259 (the tiny preset has 320 rows); ids from
259 up are reserved special tokens so that whatever id a model samples decodes to something.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worker.data import ByteTokenizer

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for every byte: the alphabet the ByteLevel pre-tokenizer
    maps bytes to, so a vocabulary keyed by these characters is a vocabulary of bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    shifted = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + shifted)
            shifted += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def special_tokens(vocab_size: int) -> list[str]:
    """The tokens of ids 256..vocab_size-1: BOS, EOS, PAD, then reserved ones."""
    reserved = [f"<|reserved_{i}|>" for i in range(ByteTokenizer.vocab_size, vocab_size)]
    return [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *reserved]


def byte_tokenizer(vocab_size: int, *, model_max_length: int) -> Any:
    """A PreTrainedTokenizerFast equal to ByteTokenizer on every text, covering ids up to `vocab_size`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: b for b, char in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split and no prefix space: the text becomes its UTF-8 bytes and nothing else.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in special_tokens(max(vocab_size, ByteTokenizer.vocab_size))])
    # split_special_tokens: a text that spells "<|eos|>" is bytes, as ByteTokenizer encodes it, not EOS.
    # No post-processor: training never put BOS in front of a document, so encoding adds nothing either.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        split_special_tokens=True, model_max_length=model_max_length,
    )


def save_byte_tokenizer(tokenizer: Any, out: Path) -> None:
    """save_pretrained, naming the class every transformers version knows (v5 would write its new
    TokenizersBackend, which older versions cannot load; both load PreTrainedTokenizerFast)."""
    tokenizer.save_pretrained(str(out))
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
