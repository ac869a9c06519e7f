"""Attention for the whole project goes through :func:`attention`."""

from lapvqa.ops.attention import attention, attention_backend

__all__ = ["attention", "attention_backend"]
