"""Selector scoring: routing-tree candidates scored against each query tile's routing window."""
