"""Imported once by the forkserver before it forks workers, so each worker starts warm
(numpy/PIL/simplejpeg/botocore loaded, GPT-2 tokenizer built) instead of paying that per process."""

import boto3  # noqa: F401  (S3 outputs/inputs: botocore's import is the slow part of a client)

from ..tokenizer import get_tokenizer
from . import images, samples, writer  # noqa: F401

get_tokenizer()
