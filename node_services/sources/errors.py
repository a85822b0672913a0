"""Errors of the source boundary: an API object that cannot become a record."""

from __future__ import annotations


class TranslateError(ValueError):
    """An object failed validation. ``ref`` names it: ``Service default/web``, ``host 1h1``."""

    def __init__(self, ref: str, reason: str) -> None:
        super().__init__(f"{ref}: {reason}")
        self.ref = ref
        self.reason = reason


class UnsupportedObject(TranslateError):
    """A well-formed object of a kind no service uses (a ConfigMap, a Cattle volume, ...)."""


class InputLimitError(ValueError):
    """A document exceeds one of the loader's documented limits (nesting depth, alias uses,
    alias expansion). The message says which, and where."""
