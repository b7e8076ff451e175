"""A shortcut with a known answer: a spurious feature planted in the training pairs.

Crome's promise is that a reward model trained on its augmented data does not take a shortcut
it was never told about. This module makes that testable:

* :func:`plant` puts a content-free feature (:data:`FEATURES`) on the **chosen** answer of a
  seeded ``rate`` share of the training pairs and on the **rejected** answer of the rest, so
  that the feature predicts the label ``rate`` of the time while saying nothing about quality.
* :func:`shortcut_sets` makes two held-out twins of an evaluation set: the feature on the
  rejected answer only (``anti``: a model that follows the feature gets them wrong) and on the
  chosen answer only (``pro``). The clean set itself is the third view; the three share pair
  ids, so the fall from clean to anti is a paired figure.

Nothing downstream is told which feature was planted: the augmentation sees the planted pairs
as any other training data.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence

from crome.data.schema import PairRecord

PREAMBLE = "Great question! I'm happy to help with that. "
CLOSER = "I am confident this answer is correct and complete."

# feature -> the answer with it; each applies to any answer and changes no content
FEATURES: dict[str, Callable[[str], str]] = {
    "preamble": lambda text: PREAMBLE + text.lstrip(),
    "closer": lambda text: text.rstrip() + "\n\n" + CLOSER,
}
SHORTCUT_SETS = ("shortcut-anti", "shortcut-pro")


def feature_fn(feature: str) -> Callable[[str], str]:
    try:
        return FEATURES[feature]
    except KeyError:
        raise ValueError(f"unknown shortcut feature {feature!r}; known: "
                         f"{', '.join(FEATURES)}") from None


def plant(records: Sequence[PairRecord], feature: str, rate: float,
          seed: int = 0) -> list[PairRecord]:
    """Copies of ``records`` with ``feature`` on the chosen answer of ``round(rate · n)``
    preference pairs (a seeded choice) and on the rejected answer of the others; ties are
    returned unchanged. Provenance records which side got it (``shortcut``)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"the shortcut rate is a share between 0 and 1, got {rate}")
    add = feature_fn(feature)
    prefs = [i for i, r in enumerate(records) if r.label == "chosen"]
    on_chosen = set(random.Random(f"shortcut\0{feature}\0{seed}").sample(
        prefs, round(rate * len(prefs))))
    out = []
    for i, rec in enumerate(records):
        if rec.label != "chosen":
            out.append(rec)
            continue
        side = "chosen" if i in on_chosen else "rejected"
        out.append(dataclasses.replace(
            rec, chosen=add(rec.chosen) if side == "chosen" else rec.chosen,
            rejected=add(rec.rejected) if side == "rejected" else rec.rejected,
            provenance={**rec.provenance, "shortcut": {"feature": feature, "side": side}}))
    return out


def shortcut_sets(records: Sequence[PairRecord],
                  feature: str) -> dict[str, list[PairRecord]]:
    """``{"shortcut-anti": ..., "shortcut-pro": ...}``: the preference pairs of ``records``
    with ``feature`` on the rejected answer only, and on the chosen answer only (same ids)."""
    add = feature_fn(feature)
    prefs = [r for r in records if r.label == "chosen"]
    return {
        "shortcut-anti": [dataclasses.replace(r, rejected=add(r.rejected)) for r in prefs],
        "shortcut-pro": [dataclasses.replace(r, chosen=add(r.chosen)) for r in prefs],
    }
