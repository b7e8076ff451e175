"""The rules backend's exact intervention, and the SQLite cache in front of any backend."""

from __future__ import annotations

import json

from crome.data.sources import final_number, load_gsm8k
from crome.oracle import OracleOptions, OracleRequest, Sampling, make_oracle
from crome.oracle.cache import CachedOracle, OracleCache
from crome.oracle.rules import RulesOracle, change_final_number


def rewrite(answer: str, attribute: str = "correctness", direction: str = "degrade",
            seed: int = 0) -> OracleRequest:
    return OracleRequest.make([{"role": "user", "content": f"rewrite {answer}"}],
                              Sampling(seed=seed),
                              task={"kind": "rewrite", "attribute": attribute,
                                    "direction": direction, "answer": answer, "prompt": "q"})


def test_change_final_number_on_real_gsm8k_solutions():
    items = load_gsm8k("test", limit=30)
    changed = 0
    for item in items:
        for _model, text, _correct in item.solutions:
            new = change_final_number(text)
            assert new is not None
            # only the final number moves: every other line is untouched
            old_lines, new_lines = text.split("\n"), new.split("\n")
            assert len(old_lines) == len(new_lines)
            assert sum(a != b for a, b in zip(old_lines, new_lines)) <= 2
            assert final_number(new) != final_number(text)
            changed += 1
    assert changed >= 100


def test_rules_apply_only_where_exact():
    oracle = RulesOracle()
    ok, up, other, nonum = oracle.generate([
        rewrite("So the total is 5 + 13 = 18.\n#### 18"),
        rewrite("#### 18", direction="upgrade"),
        rewrite("#### 18", attribute="relevance"),
        rewrite("No digits here."),
    ])
    assert ok.ok and final_number(ok.text) != "18"
    assert "= 18" not in ok.text  # the same number on the reasoning line moved with it
    for resp in (up, other, nonum):
        assert not resp.ok and resp.final and resp.error.startswith("rules:")
    rubric = oracle.generate([OracleRequest.make([{"role": "user", "content": "x"}],
                                                 task={"kind": "rubric", "prompt": "x"})])[0]
    assert {a["name"] for a in json.loads(rubric.text)} >= {"correctness", "relevance"}


def test_rules_are_deterministic_per_seed():
    a = RulesOracle().generate([rewrite("It is 40.", seed=1)])[0].text
    b = RulesOracle().generate([rewrite("It is 40.", seed=1)])[0].text
    assert a == b and a != "It is 40."


class Counting:
    """Wraps a backend and counts the requests that reach it."""

    def __init__(self, inner):
        self.inner, self.backend, self.model, self.calls = inner, inner.backend, inner.model, 0

    def generate(self, requests, on_result=None):
        self.calls += len(requests)
        return self.inner.generate(requests, on_result)

    def close(self):
        pass


def test_cache_rerun_makes_no_calls_and_keeps_failures_out(tmp_path):
    reqs = [rewrite(f"The answer is {n}.") for n in range(5)] + [rewrite("no number")]
    backend = Counting(RulesOracle())
    first = CachedOracle(backend, OracleCache(tmp_path / "c.sqlite3"))
    seen = []
    out1 = first.generate(reqs, on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == list(range(6))
    assert backend.calls == 6 and first.stats.stored == 5 and first.stats.failed == 1
    first.close()

    backend2 = Counting(RulesOracle())
    second = CachedOracle(backend2, OracleCache(tmp_path / "c.sqlite3"))
    out2 = second.generate(reqs)
    assert backend2.calls == 1  # only the failure is asked again
    assert second.stats.hits == 5
    assert [r.text for r in out1] == [r.text for r in out2]
    assert all(r.cached for r in out2[:5])


def test_cache_key_separates_sampling_and_model(tmp_path):
    cache = OracleCache(tmp_path / "c.sqlite3")
    oracle = CachedOracle(RulesOracle(), cache)
    oracle.generate([rewrite("It is 40.", seed=1), rewrite("It is 40.", seed=2)])
    assert len(cache) == 2


def test_make_oracle_specs(tmp_path):
    oracle = make_oracle(OracleOptions(spec="rules", cache=str(tmp_path / "c.sqlite3")))
    assert isinstance(oracle, CachedOracle) and oracle.backend == "rules"
    assert make_oracle(OracleOptions(spec="rules", cache="off")).backend == "rules"
    for bad in ("gpt4", "openai"):
        try:
            make_oracle(OracleOptions(spec=bad, cache="off"))
        except ValueError as e:
            assert "oracle" in str(e)
        else:
            raise AssertionError(bad)
