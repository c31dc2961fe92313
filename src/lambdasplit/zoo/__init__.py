"""Bundled default models that work with no network (see registry.py)."""

from lambdasplit.zoo.registry import ZOO, resolve

__all__ = ["ZOO", "resolve"]
