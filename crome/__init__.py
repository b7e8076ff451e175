"""crome: causally robust reward modelling (Crome, arXiv 2506.16507)."""

import os

# Intel MKL's strict conditional numerical reproducibility: a row of a float32 matrix
# product then comes out the same whatever other rows share the product. That is what makes
# a reward independent of its batch (crome.score), and a served reward equal to an offline
# one bit for bit. MKL reads this at its first call, so it must be set before the process's
# first matrix product; a value set by the user wins. Measured on an Intel Xeon (family 6
# model 167): about 3% slower scoring, and 1-row blocks instead of 8-row ones (crome.score).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
