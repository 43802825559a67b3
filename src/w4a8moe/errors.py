"""Typed errors raised at the package's boundaries."""

from __future__ import annotations


class W4A8MoEError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(W4A8MoEError):
    """A checkpoint on disk is missing, malformed or inconsistent.

    The message always names the file or tensor concerned, what was expected and what
    was found.
    """


class ConfigError(W4A8MoEError):
    """A model or quantization configuration is missing a key or holds a bad value."""


class ConversionError(W4A8MoEError):
    """A conversion cannot proceed (unsupported source, inconsistent resume state, ...)."""
