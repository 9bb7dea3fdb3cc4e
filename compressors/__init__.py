"""Compressors, registered by name (see `registry`)."""

from .base import Compressed, Compressor, SpanSelector, knapsack
from .registry import available_methods, get_compressor, register

__all__ = ["Compressed", "Compressor", "SpanSelector", "knapsack", "available_methods", "get_compressor", "register"]
