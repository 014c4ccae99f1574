"""Triton kernels and their pure-torch references (imports nothing of ours)."""
