"""Scoring: bit-identical for any batch size, in input order, written one row per input."""

from __future__ import annotations

import json
import random

import pytest

import crome.score
from crome.data.io import write_pairs
from crome.data.sources import load_source
from crome.model import ModelOptions, RewardModel
from crome.score import (
    BLOCK_ROWS,
    RewardModelScorer,
    ScoreOptions,
    ScoreStats,
    row_block,
    rows_independent,
    score_encoded,
    score_file,
    score_pairs,
    score_texts,
)

BATCH_SIZES = (1, 8, 16, 64)


@pytest.fixture(scope="module")
def bert_rm(tiny_bert, helpers) -> RewardModel:
    return helpers.perturbed_rm(tiny_bert)


@pytest.fixture(scope="module")
def chat_rm(tiny_chat, helpers) -> RewardModel:
    return helpers.perturbed_rm(tiny_chat)


@pytest.fixture(scope="module")
def saved_rm(bert_rm, tmp_path_factory):
    return bert_rm.save(tmp_path_factory.mktemp("saved-rm") / "rm")


@pytest.mark.parametrize("which,sharing", [("bert_rm", None), ("chat_rm", False),
                                           ("chat_rm", True)])
def test_scores_are_identical_for_every_batch_size(request, helpers, which, sharing):
    rm = request.getfixturevalue(which)
    records = helpers.varied_pairs(40, seed=11)
    lengths = {len(e) for e in rm.formatter.encode_many(
        [r.prompt for r in records], [r.chosen for r in records])}
    assert max(lengths) - min(lengths) > 60  # several length buckets
    results = {bs: score_pairs(rm, records, ScoreOptions(batch_size=bs, prefix_sharing=sharing))
               for bs in BATCH_SIZES}
    for bs in BATCH_SIZES[1:]:
        assert results[bs] == results[1], f"batch size {bs} differs from 1"
    # and the same as scoring each answer on its own: bit for bit one row per answer; a
    # packed answer's attention also holds its pack-mates' (masked) keys, so within rounding
    one = score_texts(rm, [records[7].prompt], [records[7].rejected],
                      ScoreOptions(prefix_sharing=sharing))
    if sharing:
        assert one == pytest.approx([results[1][1][7]], rel=1e-6, abs=1e-7)
    else:
        assert one == [results[1][1][7]]


def test_scores_follow_the_input_order(bert_rm, helpers):
    records = helpers.varied_pairs(40, seed=12)
    chosen, rejected = score_pairs(bert_rm, records, ScoreOptions(batch_size=16))
    assert len(set(chosen + rejected)) == 80  # distinct, so a mix-up would show
    perm = list(range(len(records)))
    random.Random(0).shuffle(perm)
    c2, r2 = score_pairs(bert_rm, [records[i] for i in perm], ScoreOptions(batch_size=16))
    assert c2 == [chosen[i] for i in perm]
    assert r2 == [rejected[i] for i in perm]


def test_score_pairs_matches_score_texts_and_counts(bert_rm, helpers):
    records = helpers.varied_pairs(10, seed=13)
    stats = ScoreStats()
    chosen, rejected = score_pairs(bert_rm, records, ScoreOptions(batch_size=8), stats)
    assert chosen == score_texts(bert_rm, [r.prompt for r in records],
                                 [r.chosen for r in records])
    assert rejected == score_texts(bert_rm, [r.prompt for r in records],
                                   [r.rejected for r in records])
    assert stats.sequences == 20 == stats.truncation.sequences
    assert 0 < stats.non_padding_fraction <= 1
    assert stats.padded_tokens % row_block() == 0


@pytest.mark.parametrize("independent", [True, False])
def test_forward_passes_are_padded_to_blocks_only_where_rows_depend_on_each_other(
        bert_rm, helpers, monkeypatch, independent):
    monkeypatch.setattr(crome.score, "rows_independent", lambda *a: independent)
    records = helpers.varied_pairs(5, seed=16)
    rows: list[int] = []
    forward = bert_rm.forward
    monkeypatch.setattr(bert_rm, "forward", lambda b: rows.append(len(b.input_ids)) or forward(b))
    got = score_texts(bert_rm, [r.prompt for r in records], [r.chosen for r in records])
    assert sum(rows) == 5 if independent else all(n % BLOCK_ROWS == 0 for n in rows)
    monkeypatch.undo()
    again = score_texts(bert_rm, [r.prompt for r in records], [r.chosen for r in records])
    if independent == crome.score.rows_independent():
        assert got == again  # the path this machine takes: the same bits
    else:
        # the other path than this machine's (on an AVX2-only EPYC a row's bits depend on
        # the rows beside it): the same rewards up to the last bits
        assert got == pytest.approx(again, abs=1e-5)


def test_the_real_minilm_scores_a_row_alike_in_any_chunk_of_a_batch():
    # The case that broke 8-row blocks on an Intel Xeon: 256 tokens, real weights, rows
    # scored in random chunks (as the reward server's batches take them) vs all at once.
    records = load_source("hh-rlhf/helpful-base", limit=60).records
    rm = RewardModel.create(ModelOptions(max_length=256))
    encs = rm.formatter.encode_many([r.prompt for r in records] * 2,
                                    [r.chosen for r in records] + [r.rejected for r in records])
    whole = score_encoded(rm, encs, ScoreOptions(batch_size=64))
    order = list(range(len(encs)))
    random.Random(0).shuffle(order)
    chunked: dict[int, float] = {}
    rng = random.Random(1)
    start = 0
    while start < len(order):
        idx = order[start:start + rng.randint(1, 40)]
        chunked.update(zip(idx, score_encoded(rm, [encs[i] for i in idx])))
        start += len(idx)
    assert [chunked[i] for i in range(len(encs))] == whole
    if rows_independent():
        assert row_block() == 1


def test_scoring_leaves_the_training_mode_alone(bert_rm, helpers):
    bert_rm.model.train()
    try:
        score_pairs(bert_rm, helpers.varied_pairs(3))
        assert bert_rm.model.training
    finally:
        bert_rm.model.eval()


def test_scorer_protocol(bert_rm, helpers):
    recs = helpers.varied_pairs(5, seed=14)
    scorer = RewardModelScorer(bert_rm, ScoreOptions(batch_size=8), name="tiny")
    got = scorer.score([r.prompt for r in recs], [r.chosen for r in recs])
    assert got == score_pairs(bert_rm, recs)[0]
    assert scorer.stats.sequences == 5


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_score_file_writes_one_row_per_input_in_input_order(saved_rm, helpers, tmp_path,
                                                            suffix):
    records = helpers.varied_pairs(30, seed=15)
    random.Random(1).shuffle(records)  # ids not sorted, lengths not sorted
    src = tmp_path / "in.jsonl"
    write_pairs(records, src)
    out = tmp_path / f"scores{suffix}"
    stats, report = score_file(saved_rm, src, out, ScoreOptions(batch_size=16))
    assert report.read == 30 and report.skipped == 0
    assert stats.sequences == 60
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(out).to_pylist()
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r.id for r in records]
    assert [r["subset"] for r in rows] == [r.subset for r in records]
    chosen, rejected = score_pairs(RewardModel.load(saved_rm), records)
    assert [r["reward_chosen"] for r in rows] == chosen
    assert [r["reward_rejected"] for r in rows] == rejected
    assert [r["margin"] for r in rows] == [c - j for c, j in zip(chosen, rejected)]


@pytest.mark.slow
def test_real_minilm_scores_are_identical_for_every_batch_size(helpers):
    """The packaged MiniLM (22M parameters): real matrix sizes, where a CPU matmul's result
    can depend on the shape of the batch around a row."""
    rm = RewardModel.create(ModelOptions(max_length=96, seed=0))
    records = helpers.varied_pairs(12, seed=16)
    results = {bs: score_pairs(rm, records, ScoreOptions(batch_size=bs))
               for bs in BATCH_SIZES}
    for bs in BATCH_SIZES[1:]:
        assert results[bs] == results[1], f"batch size {bs} differs from 1"


def test_bf16_is_decided_by_a_timed_matmul():
    from crome.score import BF16_NATIVE_MAX_RATIO, Bf16Speed, bf16_speed, bf16_supported

    speed = bf16_speed()
    assert speed.fp32_seconds > 0 and speed.bf16_seconds > 0
    assert bf16_supported() == (speed.ratio <= BF16_NATIVE_MAX_RATIO)
    assert Bf16Speed(fp32_seconds=0.01, bf16_seconds=0.2).native is False  # emulated: 20x
    assert Bf16Speed(fp32_seconds=0.01, bf16_seconds=0.004).native is True
