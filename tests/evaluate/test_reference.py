import json
from pathlib import Path

import pytest

from crome.data.schema import PairRecord
from crome.data.sources import resolve_data_dir
from crome.evaluate.metrics import overall_accuracy, pair_outcomes, summarize
from crome.evaluate.reference import (
    MARKDOWN_FEATURES,
    REFERENCE_SCORERS,
    LongerWins,
    MarkdownWins,
    Scorer,
    get_reference_scorer,
    markdown_features,
    score_pairs,
)

REAL_LOOKING = """## Installing the package

Here is **how** to do it; see [the docs](https://example.com/docs) and *this* note.

1. Create a virtual environment with `python -m venv .venv`
2. Run **pip install crome** in it
3) Check that it works

* a first point about snake_case_names
- a second point: 2*3*4 = 24, and 5 * 3 = 15
+ a third point, with __strong__ words and _emphasis_

| option | meaning |
|--------|---------|
| `-q`   | **quiet** output |
| `-v`   | verbose |

```python
# a comment, not a heading
def f(*args, **kwargs):
    return [x for x in args]  # *not* italics
```

---
### Done
Questions? Write to <https://example.com/help>.
"""


def test_markdown_counts_on_a_real_looking_answer():
    counts = markdown_features(REAL_LOOKING)
    assert dict(counts) == {
        "heading": 2,      # "##" and "###"; the "#" comment is inside the code block
        "bullet": 3,       # "*", "-", "+"; the "---" rule is not a list item
        "numbered": 3,     # "1." "2." "3)"
        "bold": 4,         # **how**, **pip install crome**, __strong__, **quiet** (table)
        "italic": 2,       # *this*, _emphasis_; not snake_case, 2*3*4 or 5 * 3
        "code_fence": 1,
        "table": 1,        # one table, however many rows
        "link": 2,         # [the docs](...) and <https://...>
    }
    assert set(counts) == set(MARKDOWN_FEATURES)
    assert MarkdownWins().score(["q"], [REAL_LOOKING]) == [float(sum(counts.values()))]


def test_plain_prose_and_code_have_no_features():
    prose = ("The answer is 42. Multiply 6*7 to check, or read my_variable_name in "
             "the file. Use a - b when a > b.")
    assert sum(markdown_features(prose).values()) == 0
    code_only = "```\n# heading?\n- item?\n**bold?**\n[link](http://x.y)\n```"
    assert dict(markdown_features(code_only)) == {
        k: int(k == "code_fence") for k in MARKDOWN_FEATURES}
    unclosed = "Intro with **bold**\n~~~\n**not counted**\n* not a bullet"
    c = markdown_features(unclosed)
    assert (c["code_fence"], c["bold"], c["bullet"]) == (1, 1, 0)
    inline = "Call `f(*a, **k)` then `**x**`; nothing here is emphasis."
    assert markdown_features(inline)["bold"] == markdown_features(inline)["italic"] == 0


def test_bold_italic_and_nesting():
    c = markdown_features("***both*** and **bold with *italic* inside**")
    assert (c["bold"], c["italic"]) == (2, 2)
    c = markdown_features("Two fences:\n```\na\n```\ntext\n````js\nb\n````\n")
    assert c["code_fence"] == 2


def test_markdown_wins_equal_counts_are_ties_and_wrong():
    records = [
        PairRecord(id="formatted", prompt="q", chosen="# Title\n- a\n- b", rejected="plain"),
        PairRecord(id="same", prompt="q", chosen="**yes** it is", rejected="*no*, not"),
        PairRecord(id="plainer-better", prompt="q", chosen="plain", rejected="- a\n- b"),
    ]
    chosen, rejected = score_pairs(MarkdownWins(), records)
    assert chosen == [3.0, 1.0, 0.0] and rejected == [0.0, 1.0, 2.0]
    outcomes = pair_outcomes(records, chosen, rejected)
    assert [o.outcome for o in outcomes] == ["correct", "tie", "wrong"]
    assert overall_accuracy(outcomes) == pytest.approx(1 / 3)


def test_longer_wins():
    scorer = LongerWins()
    assert scorer.score(["q", [{"role": "user", "content": "q"}]], ["abc", "é" * 5]) == [
        3.0, 5.0]  # characters, not bytes
    with pytest.raises(ValueError, match="2 prompts but 1 answers"):
        scorer.score(["q", "q"], ["a"])


def test_registry_and_protocol():
    assert set(REFERENCE_SCORERS) == {"longer-wins", "markdown-wins"}
    for name in REFERENCE_SCORERS:
        scorer = get_reference_scorer(name)
        assert isinstance(scorer, Scorer)
        assert scorer.name == name
    assert isinstance(get_reference_scorer("longer-wins"), LongerWins)
    with pytest.raises(ValueError, match="known: longer-wins, markdown-wins"):
        get_reference_scorer("shorter-wins")


def test_score_pairs_rejects_a_scorer_that_drops_answers():
    class Lossy:
        name = "lossy"

        def score(self, prompts, answers):
            return [0.0] * (len(answers) - 1)

    records = [PairRecord(id=str(i), prompt="q", chosen="a", rejected="b") for i in range(3)]
    with pytest.raises(ValueError, match="'lossy' returned 2 and 2 rewards for 3 records"):
        score_pairs(Lossy(), records)


def _data_dir() -> Path:
    return resolve_data_dir(require=("llmbar",))


def test_longer_wins_fails_llmbar_gptinst():
    """The published figure: "the longer answer wins" scores 13.0% on Adversarial_GPTInst."""
    raw = json.loads((_data_dir() / "llmbar" / "Adversarial_GPTInst.json").read_text())
    records = [PairRecord(id=str(i), prompt=x["input"],
                          chosen=x["output_1"] if x["label"] == 1 else x["output_2"],
                          rejected=x["output_2"] if x["label"] == 1 else x["output_1"],
                          subset="llmbar-adver-GPTInst")
               for i, x in enumerate(raw)]
    outcomes = pair_outcomes(records, *score_pairs(LongerWins(), records))
    summary = summarize(outcomes)
    assert summary["n_pairs"] == 92
    assert summary["accuracy"] == pytest.approx(12 / 92)  # 13.0%
    assert summary["rewardbench"]["sections"]["Chat Hard"] == pytest.approx(12 / 92)
    lb = summary["length_bias"]
    assert lb["spearman"] == pytest.approx(1.0)
    assert lb["accuracy_chosen_longer"] == 1.0 and lb["accuracy_rejected_longer"] == 0.0
