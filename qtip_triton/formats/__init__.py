"""Readers and writers of checkpoint formats; each turns one module's tensors into a QuantizedWeight."""
