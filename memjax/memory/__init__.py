"""Product-key memory: pure functions (product_keys, read) and the NNX layer."""
