"""Block-sparse attention: each query tile attends to a list of KV blocks."""
