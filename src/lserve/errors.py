"""Errors that reach users as one clear line (the CLI prints them without a traceback)."""

from __future__ import annotations


class LServeError(Exception):
    """Base class of errors caused by input or environment, not by a bug in lserve."""


class ModelLoadError(LServeError):
    """A model path, file or format that cannot be loaded."""


class RequestRejected(LServeError):
    """A request that can never be served (too long, cannot fit in the KV cache, ...)."""


class InvalidPromptError(RequestRejected, ValueError):
    """A prompt that cannot be tokenized (text that is not valid Unicode, ...)."""


class NotSupportedError(LServeError, NotImplementedError):
    """A configuration value that is valid but not implemented by this version."""
