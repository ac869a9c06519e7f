"""Imported once by the forkserver before it forks workers, so each worker starts warm
(numpy/PIL/simplejpeg loaded, GPT-2 tokenizer built) instead of paying that per process."""

from ..tokenizer import get_tokenizer
from . import images, samples, writer  # noqa: F401

get_tokenizer()
