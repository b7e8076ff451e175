"""Evaluation: scorers, pairwise accuracy, RewardBench sections, length bias.

Typical use::

    scorer = get_reference_scorer("longer-wins")          # or a trained reward model
    chosen, rejected = score_pairs(scorer, records)
    report = summarize(pair_outcomes(records, chosen, rejected))
"""

from crome.evaluate.metrics import (
    DEFAULT_LENGTH_RATIO_EDGES,
    MATH_PRM_WEIGHT,
    REWARDBENCH_SECTIONS,
    FormatBias,
    LengthBias,
    LengthBin,
    LengthControlled,
    PairOutcome,
    SubsetScore,
    format_bias,
    length_bias,
    length_controlled_accuracy,
    overall_accuracy,
    pair_outcomes,
    rewardbench_sections,
    rewardbench_weights,
    subset_accuracy,
    summarize,
)
from crome.evaluate.reference import (
    REFERENCE_SCORERS,
    LongerWins,
    MarkdownWins,
    Scorer,
    get_reference_scorer,
    markdown_features,
    score_pairs,
)

__all__ = [
    "DEFAULT_LENGTH_RATIO_EDGES",
    "MATH_PRM_WEIGHT",
    "REFERENCE_SCORERS",
    "REWARDBENCH_SECTIONS",
    "FormatBias",
    "LengthBias",
    "LengthBin",
    "LengthControlled",
    "LongerWins",
    "MarkdownWins",
    "PairOutcome",
    "Scorer",
    "SubsetScore",
    "format_bias",
    "get_reference_scorer",
    "length_bias",
    "length_controlled_accuracy",
    "markdown_features",
    "overall_accuracy",
    "pair_outcomes",
    "rewardbench_sections",
    "rewardbench_weights",
    "score_pairs",
    "subset_accuracy",
    "summarize",
]
