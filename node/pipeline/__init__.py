"""Infer: load a series image, run a plugin, encode its outputs; the worker, offline infer and evaluate share it."""
