"""``--oracle auto``: a probe picks the fastest local backend once per machine and build."""

from __future__ import annotations

import pytest

from crome.oracle import OracleOptions, make_backend
from crome.oracle.auto import (
    AutoChoice,
    _store,
    auto_cache_path,
    cached_choice,
    choose,
    machine_key,
    probe_requests,
)


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """A fresh crome cache folder; the models stay where they are (no re-assembly)."""
    from crome.oracle.llamacpp import models_dir

    monkeypatch.setenv("CROME_MODELS", str(models_dir()))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


def test_the_pick_is_kept_per_machine_and_used(own_cache):
    assert cached_choice() is None
    key = machine_key()
    assert key == machine_key() and len(key) == 16
    # a stored pick answers without a probe, and make_backend builds what it names
    _store(AutoChoice(spec="rules", reason="stored by the test",
                      requests_per_hour={"rules": 1.0}, machine=key))
    assert auto_cache_path().parent == own_cache / "crome"
    assert choose().reason == "stored by the test"
    assert make_backend(OracleOptions(spec="auto")).backend == "rules"
    # another machine's entry is not this one's
    assert cached_choice("0" * 16) is None
    with pytest.raises(ValueError, match="takes no model"):
        make_backend(OracleOptions(spec="auto:/x.gguf"))


def test_probe_requests_are_distinct_rewrites():
    reqs = probe_requests(16)
    assert len({r.key_material() for r in reqs}) == 16
    assert all(r.sampling.temperature == 0 and r.sampling.max_tokens == 48 for r in reqs)


@pytest.mark.slow
def test_a_real_probe_picks_the_fastest_and_keeps_it(own_cache):
    from crome.score import bf16_speed

    picked = choose(refresh=True)
    assert picked.requests_per_hour["llamacpp"] > 0
    assert picked.spec == max(picked.requests_per_hour, key=picked.requests_per_hour.get)
    if not bf16_speed().native:  # transformers would run fp32: not probed
        assert set(picked.requests_per_hour) == {"llamacpp"}
        assert "bf16 emulated" in picked.reason
    else:
        assert set(picked.requests_per_hour) == {"llamacpp", "hf"}
    assert cached_choice() == picked
    assert choose() == picked  # no second probe
