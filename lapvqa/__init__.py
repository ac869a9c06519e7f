"""lapvqa: streaming-data pretraining of a chest X-ray report generator on MIMIC-CXR."""

__version__ = "0.1.0"
