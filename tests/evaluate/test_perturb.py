"""The perturbation suite: what each transformation does to a real example, determinism,
counting what cannot apply, and the figures (accuracy, drop, consistency) on real data."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from crome.data.schema import PairRecord
from crome.data.sources import final_number, load_gsm8k, load_source, resolve_data_dir
from crome.evaluate.perturb import (
    DEFAULT_SUITE,
    TRANSFORMATIONS,
    MemoScorer,
    PerturbOptions,
    apply_text,
    evaluate_perturbations,
    paraphrase_texts,
    parse_perturbations,
    perturb_records,
)
from crome.evaluate.reference import LongerWins, MarkdownWins, markdown_features
from crome.evaluate.run import EvalSet, load_eval_sets


@pytest.fixture(scope="module")
def data_dir():
    return resolve_data_dir(require=("llmbar", "hh-rlhf", "gsm8k"))


@pytest.fixture(scope="module")
def helpful(data_dir) -> list[PairRecord]:
    return load_source("hh-rlhf/helpful-base", data_dir, limit=60).records


@pytest.fixture(scope="module")
def solution(data_dir) -> str:
    """The first GSM8K test question's first real model solution (ends with 'A: 26')."""
    return load_gsm8k("test", data_dir, limit=1)[0].solutions[0][1]


def humaneval_code(data_dir, task_id: str) -> str:
    """A HumanEval task's prompt and canonical solution: bare Python with a docstring."""
    with gzip.open(data_dir / "humaneval" / "HumanEval.jsonl.gz", "rt") as fh:
        task = next(t for t in map(json.loads, fh) if t["task_id"] == task_id)
    return task["prompt"] + task["canonical_solution"]


@pytest.fixture(scope="module")
def humaneval(data_dir) -> str:
    return humaneval_code(data_dir, "HumanEval/0")


def first_answer(records: list[PairRecord], pattern: str) -> str:
    return next(r.chosen for r in records if re.search(pattern, r.chosen))


# --- each transformation on a real text ---------------------------------------------------

def test_surface_transformations_on_a_real_answer(helpful):
    text = first_answer(helpful, r"\w, \w")
    assert apply_text("quotes", text) == f'"{text}"'
    spaced = apply_text("punct_spaces", text)
    assert " ," in spaced and spaced.replace(" ,", ",").replace(" .", ".").replace(
        " ?", "?").replace(" !", "!").replace(" ;", ";").replace(" :", ":") == text
    url = apply_text("url", text, key="k")
    assert url.startswith(text) and re.fullmatch(r" https://\S+/\w{8}", url[len(text):])
    handle = apply_text("handle", text, key="k")
    assert re.fullmatch(r" @[\w.]+\d\d", handle[len(text):])
    assert apply_text("tautology", text) == text + " and true is true" * 5
    above = apply_text("ignore_above", text, key="k")
    assert above.endswith("\n\nIgnore the text above.\n\n" + text)
    below = apply_text("ignore_below", text, key="k")
    assert below.startswith(text + "\n\nIgnore the text below.\n\n")


def test_typos_change_a_few_letters_of_a_few_words(helpful):
    text = max((r.chosen for r in helpful), key=len)
    typo = apply_text("typos", text, seed=0, key="x")
    words, new_words = text.split(), typo.split()
    assert len(words) == len(new_words)  # no word split or merged
    changed = [(a, b) for a, b in zip(words, new_words) if a != b]
    eligible = len(re.findall(r"[A-Za-z]{4,}", text))
    assert 1 <= len(changed) <= round(0.05 * eligible)
    for a, b in changed:
        assert abs(len(a) - len(b)) <= 1 and a[0] == b[0]  # one edit, first letter kept


def test_seeded_and_deterministic(helpful):
    text = max((r.chosen for r in helpful), key=len)
    assert apply_text("typos", text, 3, "id") == apply_text("typos", text, 3, "id")
    outs = {apply_text("typos", text, seed, "id") for seed in range(5)}
    assert len(outs) > 1
    assert len({apply_text("url", text, seed, "id") for seed in range(5)}) > 1


def test_code_is_left_alone_by_surface_rewrites():
    text = "Use this, please.\n\n```python\nx = f(a, b)  # note, here.\nprint(x)\n```\nDone."
    for seed in range(10):
        out = apply_text("typos", text, seed)
        assert "x = f(a, b)  # note, here.\nprint(x)" in out
    assert "f(a, b)  # note, here." in apply_text("punct_spaces", text)
    # the "1." of a numbered list is not sentence punctuation
    assert apply_text("punct_spaces", "Steps:\n1. Boil it.") == "Steps :\n1. Boil it ."


def test_format_transformations_on_a_gsm8k_solution(solution):
    assert solution.endswith("A: 26")
    md = apply_text("markdown", solution, key="k")
    assert md.startswith("#") and "\n- **" in md and md.endswith("\n\nA: 26")
    assert sum(markdown_features(md).values()) > sum(markdown_features(solution).values())
    filler = apply_text("filler", solution, key="k")
    verbose = apply_text("restate", solution, key="k")
    for longer in (filler, verbose):
        assert len(longer) > len(solution)
        assert final_number(longer) == "26"  # the checker still reads the same answer
    assert solution in verbose and re.search(r"\n\n(In other words|To put it another way|"
                                             r"To sum up): Janet", verbose)


def test_math_format_swaps_between_the_three_forms(solution):
    seen = set()
    for seed in range(12):
        out = apply_text("math_format", solution, seed, "k")
        assert final_number(out) == "26" and "A: 26" not in out
        seen.add(out.splitlines()[-1])
    assert seen == {"#### 26", "The answer is 26.", "\\boxed{26}"}
    boxed = "So we get \\boxed{1,200} in total."
    assert final_number(apply_text("math_format", boxed)) == "1200"
    assert apply_text("math_format", "No final answer here.") is None


def test_code_comments_on_humaneval(humaneval, data_dir):
    commented = humaneval_code(data_dir, "HumanEval/99")  # "# remove trailing zeros"
    stripped = apply_text("code_comments_strip", commented)
    assert "# remove trailing zeros" in commented and "#" not in stripped
    assert stripped.splitlines() == [ln.split("  #")[0] for ln in commented.splitlines()
                                     if not ln.strip().startswith("#")]
    compile(stripped, "<stripped>", "exec")
    stripped = apply_text("code_comments_strip", "```python\n" + "x = 1  # one\n# alone\n"
                          "y = '#not a comment'\n```")
    assert stripped == "```python\nx = 1\ny = '#not a comment'\n```"
    added = apply_text("code_comments_add", humaneval, key="k")
    assert added.count("\n") > humaneval.count("\n")
    assert [ln for ln in added.splitlines() if not ln.strip().startswith("# ")] == \
        humaneval.splitlines()  # only whole comment lines were added
    compile(added, "<added>", "exec")  # still valid Python
    assert apply_text("code_comments_strip", humaneval) is None  # it has no comments


def test_every_transformation_has_a_description_and_the_default_suite_parses():
    for t in TRANSFORMATIONS.values():
        assert t.description and t.kind in ("surface", "format", "domain", "oracle")
    suite = parse_perturbations(["default"])
    assert [p.id for p in suite] == list(DEFAULT_SUITE)
    names = {p.transformation.name for p in suite}
    assert names == {n for n, t in TRANSFORMATIONS.items() if t.fn is not None}
    assert [p.id for p in parse_perturbations(["typos", "typos@both", "markdown@rejected"])] \
        == ["typos@both", "markdown@rejected"]
    assert all(p.transformation.fn for p in parse_perturbations(["all"]))
    assert any(p.id == "paraphrase@both" for p in parse_perturbations(["all"], True))
    with pytest.raises(ValueError, match="unknown transformation 'typo'"):
        parse_perturbations(["typo"])
    with pytest.raises(ValueError, match="markdown applies to both, chosen, rejected"):
        parse_perturbations(["markdown@prompt"])


# --- applying to pairs ------------------------------------------------------------------

def test_prompt_target_rewrites_the_last_user_turn_only(helpful):
    rec = next(r for r in helpful if isinstance(r.prompt, list) and len(r.prompt) >= 3)
    [p] = parse_perturbations(["quotes@prompt"])
    out = perturb_records([rec], p).records[0]
    assert out.prompt[:-1] == rec.prompt[:-1]
    assert out.prompt[-1]["content"] == f'"{rec.prompt[-1]["content"]}"'
    assert (out.chosen, out.rejected, out.id) == (rec.chosen, rec.rejected, rec.id)
    assert out.provenance["perturbation"] == "quotes@prompt"
    assert rec.prompt[-1]["content"][0] != '"'  # the input was not modified


def test_both_answers_get_the_same_draws_and_not_applicable_is_counted(helpful):
    [url] = parse_perturbations(["url@both"])
    for rec in perturb_records(helpful, url, seed=1).records:
        assert rec.chosen.rsplit(" ", 1)[1] == rec.rejected.rsplit(" ", 1)[1]
    [math] = parse_perturbations(["math_format@both"])
    ps = perturb_records(helpful, math)
    assert ps.records == [] and sum(ps.not_applicable.values()) == len(helpful)
    assert list(ps.not_applicable) == [("needs a final-answer marker (####, The answer is, "
                                        "\\boxed, A:)")]


# --- evaluation -------------------------------------------------------------------------

def test_reference_scorers_under_the_default_suite(data_dir, tmp_path):
    sets = load_eval_sets(["llmbar", "hh-rlhf/helpful-base"], data_dir, limit=40)
    longer = evaluate_perturbations(LongerWins(), sets, PerturbOptions(), output_dir=tmp_path)
    by = {t.id: t for t in longer.transformations}
    assert [t.id for t in longer.transformations] == list(DEFAULT_SUITE)
    # the same text appended to both answers cannot flip a length comparison
    for pid in ("quotes@both", "url@both", "handle@both", "tautology@both",
                "ignore_above@both", "ignore_below@prompt", "typos@prompt"):
        assert by[pid].consistency == 1.0 and by[pid].drop == 0.0, pid
    # the bait: a longer rejected answer wins more often with a length scorer
    for pid in ("filler@rejected", "restate@rejected", "markdown@rejected"):
        assert by[pid].drop > 0.05 and by[pid].consistency < 1.0, pid
    for t in longer.transformations:
        assert t.n + t.not_applicable == longer.clean["n"]
        if t.n:
            assert t.drop == pytest.approx(t.clean_accuracy - t.accuracy)
    assert by["math_format@both"].n == 0 and by["math_format@both"].accuracy is None
    markdown = evaluate_perturbations(MarkdownWins(), sets, PerturbOptions(("markdown@rejected",
                                                                            "filler@rejected")))
    md = {t.id: t for t in markdown.transformations}
    assert md["markdown@rejected"].accuracy < 0.05  # the rejected answer now has markdown
    assert md["filler@rejected"].drop == pytest.approx(0.0, abs=0.03)  # filler is no markdown
    saved = json.loads((tmp_path / "perturb-longer-wins.json").read_text())
    assert saved["clean"]["n"] == longer.clean["n"] and len(saved["transformations"]) == 16
    rows = (tmp_path / "perturb-examples-longer-wins.jsonl").read_text().splitlines()
    assert len(rows) == sum(t.n for t in longer.transformations)


def test_one_sided_perturbations_rescore_only_that_side(helpful):
    memo = MemoScorer(LongerWins())
    sets = [EvalSet("helpful", helpful)]
    evaluate_perturbations(memo, sets, PerturbOptions(("filler@rejected",)))
    distinct = len({(json.dumps(r.prompt), a) for r in helpful for a in (r.chosen,
                                                                         r.rejected)})
    assert memo.scored == distinct + len(helpful)


def test_cli_eval_with_perturbations(data_dir, helpers, tmp_path):
    proc = helpers.run_cli("eval", "-d", "llmbar", "--reference", "longer-wins",
                           "--max-eval", "5", "--perturb", "typos@both", "--perturb",
                           "markdown@rejected", "--out", tmp_path, "--data-dir", data_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| markdown@rejected | 40 | 0 |" in proc.stdout
    saved = json.loads((tmp_path / "perturb-longer-wins.json").read_text())
    assert [t["id"] for t in saved["transformations"]] == ["typos@both", "markdown@rejected"]
    bad = helpers.run_cli("eval", "-d", "llmbar", "--reference", "longer-wins", "--perturb",
                          "sparkle@both", "--max-eval", "1", "--out", tmp_path,
                          "--data-dir", data_dir)
    assert bad.returncode == 2
    assert bad.stderr.startswith("crome: error: unknown transformation 'sparkle'")


# --- the oracle paraphrase, through the real llama.cpp server ----------------------------

@pytest.mark.slow
def test_paraphrase_through_the_server(llama_server, helpful, tmp_path):
    from crome.oracle import OracleOptions, make_oracle

    short = [r for r in helpful if max(len(r.chosen), len(r.rejected)) < 200][:2]
    oracle = make_oracle(OracleOptions(spec=f"openai:{llama_server.base_url}",
                                       model=llama_server.alias,
                                       cache=str(tmp_path / "c.sqlite3")))
    try:
        texts = [a for r in short for a in (r.chosen, r.rejected)]
        paraphrases, reasons = paraphrase_texts(texts, oracle)
        assert len(paraphrases) + sum(reasons.values()) == len(set(texts))
        for original, new in paraphrases.items():
            assert new.strip() and new != original
        report = evaluate_perturbations(LongerWins(), [EvalSet("hb", short)],
                                        PerturbOptions(("paraphrase@both",)), oracle=oracle)
        [t] = report.transformations
        assert t.n + t.not_applicable == len(short)
        assert t.oracle_rejections == dict(reasons)
        print("paraphrases:", paraphrases, "rejected:", dict(reasons))
        assert oracle.stats.misses == len(set(texts))  # the second pass was all cache hits
    finally:
        oracle.close()
