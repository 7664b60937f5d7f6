"""Tokenizers: byte-level by default, sentencepiece or HF `tokenizers` files on request.

Every tokenizer exposes `vocab_size`, `sep_id` (the document separator used for packing),
`pad_id`, `encode(str) -> np.ndarray[int32]` and `decode(ids) -> str`.
"""

from __future__ import annotations

import numpy as np

BYTE_SPECIALS = ("<sep>", "<pad>")


class ByteTokenizer:
  """UTF-8 bytes 0..255, then the special tokens of `BYTE_SPECIALS`."""

  vocab_size = 256 + len(BYTE_SPECIALS)
  sep_id = 256
  pad_id = 257

  # Equal by type, so caches keyed on the tokenizer (the corpus stream) are shared.
  def __eq__(self, other):
    return type(other) is type(self)

  def __hash__(self):
    return hash(type(self))

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  def __init__(self, path: str):
    try:
      import sentencepiece as spm
    except ImportError as e:
      raise ImportError(
        f"data.tokenizer='sentencepiece' (data.tokenizer_path={path!r}) needs the "
        "`sentencepiece` package: pip install sentencepiece"
      ) from e
    self._sp = spm.SentencePieceProcessor(model_file=path)
    self.vocab_size = self._sp.get_piece_size()
    self.sep_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else 0
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.sep_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


class HFTokenizer:
  def __init__(self, path: str):
    try:
      import tokenizers
    except ImportError as e:
      raise ImportError(
        f"data.tokenizer='hf' (data.tokenizer_path={path!r}) needs the `tokenizers` "
        "package: pip install tokenizers"
      ) from e
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size()
    vocab = self._tok.get_vocab()
    sep = next((vocab[t] for t in ("</s>", "<|endoftext|>", "<eos>", "[SEP]") if t in vocab), 0)
    self.sep_id = sep
    self.pad_id = vocab.get("<pad>", sep)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids])


def get_tokenizer(name: str = "byte", path: str | None = None):
  if name == "byte":
    return ByteTokenizer()
  if name in ("sentencepiece", "hf") and not path:
    raise ValueError(f"data.tokenizer={name!r} needs data.tokenizer_path")
  if name == "sentencepiece":
    return SentencePieceTokenizer(path)
  if name == "hf":
    return HFTokenizer(path)
  raise ValueError(f"data.tokenizer={name!r} is not one of ('byte', 'sentencepiece', 'hf')")
