"""CLIP BPE tokenizer files in the Hugging Face layout, built from the real CLIP vocabulary.

The BPE merges come from `bpe_simple_vocab_16e6.txt.gz`, the file OpenAI's CLIP release ships and
the `open_clip` package carries. From it this module writes what a Hugging Face `CLIPTokenizer`
directory holds: `vocab.json` (49408 entries), `merges.txt` (48894 merges under a
`#version: 0.2` header), `tokenizer_config.json` and `special_tokens_map.json`.
"""

import gzip
import json
import os
from pathlib import Path

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
VOCAB_SIZE = 49408
NUM_MERGES = 49152 - 256 - 2
MODEL_MAX_LENGTH = 77


def default_bpe_path():
    """The merges file inside the installed `open_clip` package."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("open_clip is not installed: pass the BPE file explicitly")
    return Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"


def byte_symbols():
    """The printable stand-in character GPT-2 style byte-level BPE uses for each byte 0..255."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # The vocabulary lists the printable bytes first, then the remapped ones, in that order.
    order = printable + [b for b in range(256) if b not in printable]
    return [table[b] for b in order]


def read_merges(bpe_path):
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {NUM_MERGES} merge pairs")
    return merges


def build_vocab(merges):
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


def _added_token(content):
    return {
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def _write_json(path, value):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False, sort_keys=True)
        f.write("\n")


def _write_files(out_dir, vocab, merges, pad_token, model_max_length):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {
        "bos_token": _added_token(BOS),
        "eos_token": _added_token(EOS),
        "pad_token": pad_token,
        "unk_token": _added_token(EOS),
    }
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    config = {
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "errors": "replace",
        "model_max_length": model_max_length,
        "tokenizer_class": "CLIPTokenizer",
    }
    for key, value in special.items():
        config[key] = dict(value, __type="AddedToken") if isinstance(value, dict) else value
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), config)


def write_clip_tokenizer(out_dir, pad_token, bpe_path=None):
    """Write a CLIP tokenizer directory, built from CLIP's BPE merges, that pads with `pad_token`."""
    merges = read_merges(bpe_path or default_bpe_path())
    vocab = build_vocab(merges)
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
    _write_files(out_dir, vocab, merges, pad_token, MODEL_MAX_LENGTH)


def save_tokenizer_files(tokenizer, out_dir):
    """Write the vocab/merges layout for an already loaded Hugging Face CLIP tokenizer.

    Recent `transformers` versions save only `tokenizer.json`; the ONNX layout keeps the older
    file set, so the vocabulary and merges are read back from the tokenizer's BPE model.
    """
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"expected a BPE tokenizer, found {model.get('type')!r}")
    vocab = dict(sorted(model["vocab"].items(), key=lambda item: item[1]))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    _write_files(out_dir, vocab, merges, str(tokenizer.pad_token), int(tokenizer.model_max_length))
