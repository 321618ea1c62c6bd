"""Triton kernels, one concern per file, each with a pure-PyTorch reference path of the same numerics."""
