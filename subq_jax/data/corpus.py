"""The embedded default corpus: the running interpreter's standard-library source.

About 30 MB of real code, no download. A document is one directory's `.py` files
concatenated in sorted order with a header line per file (the top-level modules, one
document each), cut into pieces of at most `max_doc_bytes` so that no single directory
(the 14 MB `test/`) decides the split. The train/validation split hashes each document's
name, so it does not depend on file order or on which other files exist.
"""

from __future__ import annotations

import functools
import os
import sysconfig
import zlib

import numpy as np

SKIP_DIRS = ("site-packages", "__pycache__", "dist-packages")


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def _directory_files(root: str):
  """Yields (document name, [relative file paths]) per directory, deterministically."""
  for here, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
    rel = os.path.relpath(here, root)
    py = sorted(f for f in files if f.endswith(".py"))
    if rel == ".":
      for f in py:  # top-level modules stand alone
        yield f, [f]
    elif py:
      yield rel, [os.path.join(rel, f) for f in py]


@functools.lru_cache(maxsize=4)
def load_documents(root: str | None = None, max_doc_bytes: int = 1 << 20) -> tuple:
  """All documents as ((name, text), ...), sorted by name."""
  root = root or stdlib_root()
  docs = []
  for name, paths in _directory_files(root):
    part, size, index = [], 0, 0
    for rel in paths:
      try:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
          text = f"# ===== file: {rel} =====\n{f.read()}\n"
      except (UnicodeDecodeError, OSError):
        continue
      if part and size + len(text) > max_doc_bytes:
        docs.append((f"{name}#{index}", "".join(part)))
        part, size, index = [], 0, index + 1
      part.append(text)
      size += len(text)
    if part:
      docs.append((f"{name}#{index}", "".join(part)))
  if not docs:
    raise FileNotFoundError(f"no .py files under {root!r} (the embedded corpus)")
  return tuple(sorted(docs))


def split_of(name: str, val_fraction: float) -> str:
  return "validation" if zlib.crc32(name.encode()) % 10_000 < val_fraction * 10_000 else "train"


@functools.lru_cache(maxsize=8)
def token_stream(tokenizer, split: str, val_fraction: float = 0.05, root: str | None = None):
  """The split's documents tokenized and joined by the separator: one int32 array."""
  pieces = []
  for name, text in load_documents(root):
    if split_of(name, val_fraction) == split:
      pieces.append(tokenizer.encode(text))
      pieces.append(np.asarray([tokenizer.sep_id], np.int32))
  if not pieces:
    raise ValueError(f"split={split!r} of the corpus is empty (val_fraction={val_fraction})")
  return np.concatenate(pieces)
