"""Training on tiny models: it learns, ties pull rewards together, resume and gradient
accumulation change nothing, and two processes train the same model as one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import crome.train as train_mod
from crome.data.io import write_pairs
from crome.model import LoraOptions, ModelOptions, RewardModel
from crome.score import score_pairs
from crome.train import LOG_FILE, SUMMARY_FILE, TrainOptions, train


def options(backbone: str, out: Path, **kw) -> TrainOptions:
    model = kw.pop("model", None) or ModelOptions(backbone=backbone, max_length=64)
    base = dict(output_dir=str(out), model=model, batch_size=8, lr=3e-3, bf16=False,
                progress=False, log_every=1, warmup_ratio=0.0)
    base.update(kw)
    return TrainOptions(**base)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def accuracy(rm: RewardModel, records) -> float:
    chosen, rejected = score_pairs(rm, records)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(records)


def test_tiny_run_learns_a_keyword(tiny_bert, helpers, tmp_path):
    records = helpers.keyword_pairs(32, seed=0)
    out = tmp_path / "run"
    before = accuracy(RewardModel.create(ModelOptions(backbone=tiny_bert, max_length=64)),
                      records)
    summary = train(records, options(tiny_bert, out, epochs=5))
    assert summary.steps == 20 and summary.pairs == 32 and summary.ties == 0
    assert summary.epochs == 5.0 and summary.num_processes == 1
    assert 0 < summary.non_padding_fraction <= 1
    losses = [json.loads(line)["loss"] for line in (out / LOG_FILE).read_text().splitlines()]
    assert len(losses) == 20
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert json.loads((out / SUMMARY_FILE).read_text())["steps"] == 20
    after = accuracy(RewardModel.load(out), records)
    assert after > 0.9 > before


def test_tie_pairs_pull_rewards_together(tiny_bert, helpers, tmp_path):
    records = helpers.tie_pairs(16, seed=0)
    model = ModelOptions(backbone=tiny_bert, max_length=64, seed=3)
    start = RewardModel.create(model)
    # give the start model a real spread, as a model trained on preferences would have
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in start.model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    start.save(tmp_path / "start")
    c0, r0 = score_pairs(start, records)
    gap_before = np.mean(np.abs(np.subtract(c0, r0)))
    summary = train(records, options(str(tmp_path / "start"), tmp_path / "run", epochs=6,
                                     lr=3e-3, model=ModelOptions(
                                         backbone=str(tmp_path / "start"), max_length=64)))
    assert summary.ties == 16
    c1, r1 = score_pairs(RewardModel.load(tmp_path / "run"), records)
    gap_after = np.mean(np.abs(np.subtract(c1, r1)))
    assert gap_before > 1e-3
    assert gap_after < 0.5 * gap_before


class Crash(Exception):
    pass


def test_resume_after_a_crash_matches_an_uninterrupted_run(tiny_bert, helpers, tmp_path,
                                                           monkeypatch):
    records = helpers.keyword_pairs(24, seed=4)
    kw = dict(epochs=2, batch_size=4, checkpoint_every=4)  # 6 steps per epoch, 12 in all
    full = tmp_path / "full"
    train(records, options(tiny_bert, full, **kw))

    run = tmp_path / "run"
    real_checkpoint = train_mod._checkpoint

    def checkpoint_then_crash(accelerator, out, step, keep):
        real_checkpoint(accelerator, out, step, keep)
        if step == 8:  # inside the second epoch
            raise Crash

    monkeypatch.setattr(train_mod, "_checkpoint", checkpoint_then_crash)
    with pytest.raises(Crash):
        train(records, options(tiny_bert, run, **kw))
    monkeypatch.undo()
    assert not (run / "model.safetensors").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-8"]

    summary = train(records, options(tiny_bert, run, resume=True, **kw))
    assert summary.resumed_from_step == 8 and summary.steps == 12
    diff = max_abs_diff(weights(run), weights(full))
    assert diff <= 1e-6, diff


def test_resume_after_max_steps_matches_an_uninterrupted_run(tiny_bert, helpers, tmp_path):
    records = helpers.keyword_pairs(24, seed=4)
    kw = dict(epochs=2, batch_size=4, checkpoint_every=2)
    full = tmp_path / "full"
    train(records, options(tiny_bert, full, **kw))
    run = tmp_path / "run"
    first = train(records, options(tiny_bert, run, max_steps=4, **kw))
    assert first.steps == 4
    summary = train(records, options(tiny_bert, run, resume=True, **kw))
    assert summary.steps == 12
    assert max_abs_diff(weights(run), weights(full)) <= 1e-6


def margins(run_dir: Path, records) -> np.ndarray:
    chosen, rejected = score_pairs(RewardModel.load(run_dir), records)
    return np.subtract(chosen, rejected)


HEAD_BIAS = "classifier.bias"


@pytest.fixture(scope="module")
def accum_runs(tiny_bert, helpers, tmp_path_factory):
    """The same 24 pairs (16 preferences, 8 ties) trained with grad_accum 1 and 2."""
    records = helpers.keyword_pairs(16, seed=5) + helpers.tie_pairs(8, seed=5)
    tmp = tmp_path_factory.mktemp("accum")
    runs = {accum: tmp / f"accum{accum}" for accum in (1, 2)}
    for accum, out in runs.items():
        train(records, options(tiny_bert, out, epochs=2, grad_accum=accum))
    return records, runs


def test_grad_accum_matches_a_single_micro_batch(tiny_bert, accum_runs):
    records, runs = accum_runs
    wa, wb = weights(runs[1]), weights(runs[2])
    start = RewardModel.create(ModelOptions(backbone=tiny_bert, max_length=64))
    start_w = {k: v for k, v in start.model.state_dict().items() if k in wa}
    assert max_abs_diff(wa, start_w) > 1e-3  # training did move the weights
    # Everything but the head's bias (see the next test) within float noise ...
    drop = lambda w: {k: v for k, v in w.items() if k != HEAD_BIAS}  # noqa: E731
    assert max_abs_diff(drop(wa), drop(wb)) <= 5e-4
    # ... and what the model says about every pair, its margin, agrees tightly.
    np.testing.assert_allclose(margins(runs[2], records), margins(runs[1], records),
                               atol=1e-4, rtol=0)


def test_grad_accum_gives_the_same_absolute_rewards(accum_runs):
    records, runs = accum_runs
    assert float((weights(runs[1])[HEAD_BIAS] - weights(runs[2])[HEAD_BIAS]).abs()) <= 1e-4
    a = score_pairs(RewardModel.load(runs[1]), records[:4])
    b = score_pairs(RewardModel.load(runs[2]), records[:4])
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_batch_smaller_than_processes_times_accumulation_is_refused(tiny_bert, helpers,
                                                                     tmp_path):
    with pytest.raises(ValueError, match="batch_size 2 is smaller"):
        train(helpers.keyword_pairs(4), options(tiny_bert, tmp_path / "r", batch_size=2,
                                                grad_accum=4))


def test_truncation_is_counted_in_the_summary(tiny_bert, helpers, tmp_path):
    records = helpers.varied_pairs(8, seed=6)
    summary = train(records, options(tiny_bert, tmp_path / "r", max_steps=1,
                                     model=ModelOptions(backbone=tiny_bert, max_length=24,
                                                        min_prompt_tokens=4)))
    t = summary.truncation
    assert t["sequences"] == 16
    assert t["prompt_truncated"] > 0 and t["answer_truncated"] > 0
    saved = json.loads((tmp_path / "r" / SUMMARY_FILE).read_text())
    assert saved["truncation"] == t


def test_lora_training_saves_the_trained_head(tiny_bert, helpers, tmp_path):
    records = helpers.keyword_pairs(16, seed=7)
    model = ModelOptions(backbone=tiny_bert, max_length=64, seed=2,
                         lora=LoraOptions(r=4, alpha=8, target_modules=["query", "value"]))
    out = tmp_path / "lora"
    train(records, options(tiny_bert, out, epochs=3, lr=1e-2, model=model))
    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    loaded = RewardModel.load(out)
    head = loaded.model.base_model.model.classifier.modules_to_save["default"]
    fresh = RewardModel.create(model).model.base_model.model.classifier
    fresh_head = fresh.modules_to_save["default"]
    assert torch.equal(head.weight, saved["base_model.model.classifier.weight"])
    assert torch.equal(head.bias, saved["base_model.model.classifier.bias"])
    assert not torch.allclose(head.weight, fresh_head.weight, atol=1e-4)
    assert not torch.allclose(head.weight, fresh.original_module.weight, atol=1e-4)


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_and_prefix_sharing_train_the_same_decoder(tiny_chat, helpers,
                                                                          tmp_path, lora,
                                                                          monkeypatch):
    """A decoder trained with packed pairs, with activation checkpointing, or with neither
    ends at the same rewards: both are ways of computing the same gradients."""
    import transformers.modeling_utils as mu

    recomputed = []

    def counting_checkpoint(*args, **kwargs):  # a spy: torch's checkpoint, counted
        recomputed.append(1)
        return torch.utils.checkpoint.checkpoint(*args, **kwargs)

    monkeypatch.setattr(mu, "checkpoint", counting_checkpoint)
    records = helpers.varied_pairs(16, seed=8) + helpers.tie_pairs(4, seed=8)
    adapters = LoraOptions(r=4, alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None
    model = ModelOptions(backbone=tiny_chat, max_length=96, seed=2, lora=adapters)
    runs = {}
    for name, kw in {"plain": {"prefix_sharing": False},
                     "packed": {"prefix_sharing": True},
                     "packed+checkpointing": {"prefix_sharing": True,
                                              "gradient_checkpointing": True}}.items():
        out = tmp_path / name
        recomputed.clear()
        summary = train(records, options(tiny_chat, out, epochs=2, model=model, **kw))
        assert bool(recomputed) == kw.get("gradient_checkpointing", False)
        assert summary.prefix_sharing == kw["prefix_sharing"]
        assert (summary.shared_tokens > 0) == kw["prefix_sharing"]
        runs[name] = score_pairs(RewardModel.load(out), records)
    plain = torch.tensor(runs["plain"])
    fresh = torch.tensor(score_pairs(RewardModel.create(model), records))
    assert (plain - fresh).abs().max() > 1e-2  # training moved the rewards
    for name in ("packed", "packed+checkpointing"):
        assert torch.allclose(torch.tensor(runs[name]), plain, atol=2e-5, rtol=1e-4), name


# --- several processes -----------------------------------------------------------------

def _train_cli(launcher: list[str], data: Path, backbone: str, out: Path, tmp: Path,
               helpers) -> subprocess.CompletedProcess:
    args = ["train", "--data", str(data), "--backbone", backbone, "--out", str(out),
            "--batch-size", "8", "--epochs", "2", "--lr", "3e-3", "--max-length", "64",
            "--no-bf16", "--no-progress", "--seed", "1"]
    env = helpers.cli_env()
    env["HF_HOME"] = str(tmp / "hf-home")  # no user accelerate config
    proc = subprocess.run(launcher + args, capture_output=True, text=True, env=env,
                          cwd=tmp, timeout=420)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def one_and_two_processes(tiny_bert, helpers, tmp_path_factory):
    """The same `crome train` command run as one process and as two (gloo on CPU)."""
    tmp = tmp_path_factory.mktemp("ddp")
    records = helpers.keyword_pairs(30, seed=8) + helpers.tie_pairs(6, seed=8)
    data = tmp / "pairs.jsonl"
    write_pairs(records, data)
    one, two = tmp / "one", tmp / "two"
    _train_cli([sys.executable, "-m", "crome.cli"], data, tiny_bert, one, tmp, helpers)
    # `--multi_gpu`, not `--cpu`: on a machine without GPUs accelerate then starts the
    # processes with torch.distributed.run and crome's Accelerator(cpu=True) uses gloo;
    # with `--cpu` (or neither flag) accelerate launch starts ONE process, whatever
    # --num_processes says.
    _train_cli([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(helpers.free_port()),
                "-m", "crome.cli"], data, tiny_bert, two, tmp, helpers)
    return records, one, two


@pytest.mark.slow
def test_two_processes_split_every_global_batch(one_and_two_processes):
    _, one, two = one_and_two_processes
    s1 = json.loads((one / SUMMARY_FILE).read_text())
    s2 = json.loads((two / SUMMARY_FILE).read_text())
    assert (s1["num_processes"], s2["num_processes"]) == (1, 2)
    assert s1["steps"] == s2["steps"] == 10
    assert s1["pairs"] == s2["pairs"] == 36
    assert s2["skipped_tail_pairs"] == 0
    assert s1["real_tokens"] == s2["real_tokens"]  # summed over both processes
    assert (two / "crome.json").exists()


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(one_and_two_processes):
    records, one, two = one_and_two_processes
    probe = records[:6] + records[-2:]
    c1, r1 = score_pairs(RewardModel.load(one), probe)
    c2, r2 = score_pairs(RewardModel.load(two), probe)
    # margins: what the model says about each pair
    np.testing.assert_allclose(np.subtract(c2, r2), np.subtract(c1, r1), atol=1e-4, rtol=0)
    # absolute rewards: up to the head bias, which gets no true gradient (see
    # test_grad_accum_gives_the_same_absolute_rewards)
    w1, w2 = weights(one), weights(two)
    offset = float(w2[HEAD_BIAS] - w1[HEAD_BIAS])
    np.testing.assert_allclose(np.subtract(c2, offset), c1, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.subtract(r2, offset), r1, atol=1e-4, rtol=0)
    drop = lambda w: {k: v for k, v in w.items() if k != HEAD_BIAS}  # noqa: E731
    assert max_abs_diff(drop(w1), drop(w2)) <= 1e-3  # 3.6e-4 seen: Adam on float noise


def test_sharded_runs_refuse_what_needs_whole_weights(tiny_bert, helpers, tmp_path):
    """FSDP and ZeRO-3 cannot run here (GPUs only), so their accelerator is a stand-in: the
    checks must refuse evaluation during a sharded run and a DeepSpeed accumulation count
    that differs from crome's."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    def stand_in(kind, stage=None, gas=1):
        plugin = SimpleNamespace(zero_stage=stage,
                                 deepspeed_config={"gradient_accumulation_steps": gas})
        return SimpleNamespace(distributed_type=kind, print=print,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    opts = options(tiny_bert, tmp_path, grad_accum=2)
    evals = helpers.keyword_pairs(4)
    for acc in (stand_in(DistributedType.FSDP), stand_in(DistributedType.DEEPSPEED, 3, 2)):
        assert train_mod.sharded(acc)
        with pytest.raises(ValueError, match="under FSDP or ZeRO-3"):
            train_mod._check_distributed(acc, opts, evals)
        train_mod._check_distributed(acc, opts, None)  # without evaluation: fine
    zero2 = stand_in(DistributedType.DEEPSPEED, 2, 1)
    assert not train_mod.sharded(zero2)
    with pytest.raises(ValueError, match="DeepSpeed accumulates 1 micro-batches per step but "
                                         "--grad-accum is 2"):
        train_mod._check_distributed(zero2, opts, evals)


@pytest.mark.slow
def test_the_fsdp_config_on_two_cpu_processes_says_it_runs_data_parallel(tiny_chat, helpers,
                                                                         tmp_path):
    """The packaged FSDP config with 2 CPU processes (gloo). accelerate shards only on GPUs
    (on a CPU it falls back to data parallel), so crome says so instead of pretending; the
    run still goes through the gathered-state-dict save, and the saved model holds every
    weight, the reward head included, and gives the rewards a single process trains."""
    import yaml

    from crome.launch import config_path

    config = yaml.safe_load(config_path("fsdp").read_text())
    config.update(num_processes=2, mixed_precision="no", use_cpu=True,
                  main_process_port=helpers.free_port())
    config_file = tmp_path / "fsdp-cpu.yaml"
    config_file.write_text(yaml.safe_dump(config))
    records = helpers.varied_pairs(24, seed=5) + helpers.tie_pairs(8, seed=5)
    data = tmp_path / "pairs.jsonl"
    write_pairs(records, data)
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    _train_cli([sys.executable, "-m", "crome.cli"], data, tiny_chat, one, tmp_path, helpers)
    proc = _train_cli([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       str(config_file), "-m", "crome.cli"], data, tiny_chat, fsdp, tmp_path,
                      helpers)
    assert "asks for FSDP, which accelerate runs on GPUs only; this run is MULTI_CPU" in (
        proc.stdout + proc.stderr)
    s1 = json.loads((one / SUMMARY_FILE).read_text())
    s2 = json.loads((fsdp / SUMMARY_FILE).read_text())
    assert (s1["num_processes"], s2["num_processes"]) == (1, 2)
    assert (s1["distributed"], s2["distributed"]) == ("NO", "MULTI_CPU")
    assert s1["prefix_sharing"] and s2["prefix_sharing"]
    w1, w2 = weights(one), weights(fsdp)
    assert w1.keys() == w2.keys() and "score.weight" in w2
    fresh = RewardModel.create(ModelOptions(backbone=tiny_chat, max_length=64, seed=1))
    assert not torch.allclose(w2["score.weight"], fresh.model.score.weight, atol=1e-3)
    c1, r1 = score_pairs(RewardModel.load(one), records)
    c2, r2 = score_pairs(RewardModel.load(fsdp), records)
    np.testing.assert_allclose(np.subtract(c2, r2), np.subtract(c1, r1), atol=1e-4, rtol=0)
