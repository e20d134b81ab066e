"""Attention engines: exact masked attention from a Mask or a compiled BlockLayout."""
