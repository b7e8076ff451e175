"""crome: causally robust reward modelling (Crome, arXiv 2506.16507)."""

__version__ = "0.1.0"
