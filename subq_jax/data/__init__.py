"""Data: tokenizers, the embedded stdlib corpus, synthetic retrieval tasks, grain pipelines."""
