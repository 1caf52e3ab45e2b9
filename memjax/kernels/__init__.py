"""Kernels behind memjax ops; ``embedding_bag`` dispatches to a backend."""
