"""dedup2b: near-duplicate finding and removal for web-scale image-text corpora."""
__version__ = "0.1.0"
