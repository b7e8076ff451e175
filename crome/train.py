"""Training a reward model: Bradley–Terry on preference pairs, the tie loss on neutral pairs;
or a pairwise preference model (``ModelOptions(pairwise=True)``, ``crome.pairwise``):
cross-entropy on its verdicts, each pair in both orders, ties as the "Same" class.

``setup → fit → save``, readable top to bottom. What makes it fast on a CPU and exact:

* **Little padding.** Pairs are put in batches of similar length (shuffled "mega-batches",
  sorted inside, as HF's length-grouped sampler does), and inside a micro-batch the 2·m
  sequences are sorted by length and run in chunks of ``chunk_rows`` rows, each padded only to
  its own longest sequence. One forward call of a small wrapper module runs all chunks, so
  DDP sees one forward per backward.
* **One global batch, however it is split.** ``batch_size`` is the number of pairs per
  optimizer step over all processes and accumulation steps; the sequence of global batches
  depends on the seed only. Each micro-batch's loss is its *sum* over pairs divided by the
  global batch size (times the world size, which DDP's gradient averaging divides out), so
  1 process, 2 processes or 4 accumulation steps take the same optimizer steps.
* **Nothing dropped silently.** Over-length pairs are truncated by the formatter (counted); a
  final global batch smaller than the number of processes cannot be split and is skipped
  and counted in the summary.
* **A prompt read once (decoders).** Where the model passes ``crome.packing``'s probe, a
  row holds one prompt and every answer to it in the micro-batch (a pair's two answers, cut
  to the same prompt tokens), with a block mask; the rewards and gradients are those of one
  row per answer. ``prefix_sharing`` switches it; ``gradient_checkpointing`` trades compute
  for memory.
* bf16 autocast where the hardware has native bf16 (``crome.score.bf16_supported``), fp32
  elsewhere; dropout off by default (see ``crome.model``).

Run it with ``crome train`` or, for several processes, ``accelerate launch --multi_gpu
--num_processes 2 -m crome.cli train …`` (gloo on CPU; without ``--multi_gpu`` accelerate
starts a single process on a machine with no GPU), or with a packaged config
(``crome launch-config fsdp|zero2|zero3|ddp``). Under FSDP and ZeRO-3 each process holds a
shard: the weights are gathered on every process at the end and the main one saves them, the
reward head included; such a run refuses periodic evaluation (it needs whole weights), and
DeepSpeed's own accumulation count must equal ``grad_accum``. accelerate shards only on GPUs:
on a CPU a sharded config runs data parallel, and the trainer says so.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from crome.data.schema import PairRecord
from crome.evaluate.metrics import overall_accuracy, pair_outcomes
from crome.losses import pair_loss, preference
from crome.model import (
    Batch,
    Encoded,
    ModelOptions,
    RewardModel,
    TruncationCounts,
    freeze_head_bias,
)
from crome.model_card import data_counts, write_model_card
from crome.packing import (
    PackedBatch,
    build_packs,
    chunk_packs,
    collate_for,
    packed_rewards,
    resolve_prefix_sharing,
)
from crome.progress import StageProgress
from crome.score import ScoreOptions, autocast, resolve_bf16, score_pairs

STATE_FILE = "trainer_state.json"
SUMMARY_FILE = "train_summary.json"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainOptions:
    output_dir: str = "runs/rm"
    model: ModelOptions = field(default_factory=ModelOptions)
    epochs: float = 1.0
    batch_size: int = 16  # pairs per optimizer step, over all processes and accumulation
    grad_accum: int = 1
    lr: float = 1e-4  # suits small encoders (MiniLM); use 1e-5..2e-5 for large decoders
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    tie_weight: float = 1.0  # λ of the tie loss (1 in the Crome paper)
    margin: float = 0.0
    center_coef: float = 0.0
    bf16: bool | None = None  # None: auto, on where the hardware has native bf16
    chunk_rows: int = 6  # 95.6% non-padding at 256 tokens vs 94.6% with 8 (README figures)
    # Decoders: a pair's answers share one encoding of their prompt (crome.packing); None:
    # wherever the model passes the packing probe, True: required, False: off
    prefix_sharing: bool | None = None
    max_pack_tokens: int | None = None  # None: 2 x max_length, so a pair always fits one row
    # recompute each layer's activations in the backward pass: less memory, ~1/3 more compute
    gradient_checkpointing: bool = False
    megabatch_factor: int = 32
    seed: int = 0
    max_steps: int | None = None  # stop early; the LR schedule still follows ``epochs``
    checkpoint_every: int = 0  # steps; 0 = only the final model
    keep_checkpoints: int = 2
    eval_every: int = 0  # steps; needs eval records
    log_every: int = 10
    resume: bool = False
    progress: bool = True


@dataclass
class EncodedPair:
    first: Encoded  # chosen, or the first answer of a tie (pairwise: the pair, chosen first)
    second: Encoded  # (pairwise: the pair, chosen second)
    is_tie: bool

    @property
    def length(self) -> int:
        return max(len(self.first), len(self.second))


@dataclass
class TrainSummary:
    pairs: int = 0
    ties: int = 0
    steps: int = 0
    epochs: float = 0.0
    seconds: float = 0.0
    pairs_per_second: float = 0.0
    real_tokens: int = 0
    padded_tokens: int = 0
    shared_tokens: int = 0  # prompt tokens not run again, thanks to prefix sharing
    non_padding_fraction: float = 1.0
    prefix_sharing: bool = False
    skipped_tail_pairs: int = 0
    truncation: dict[str, int] = field(default_factory=dict)
    final_loss: float | None = None
    evals: list[dict[str, Any]] = field(default_factory=list)
    num_processes: int = 1
    distributed: str = "NO"  # accelerate's DistributedType: NO, MULTI_CPU, FSDP, DEEPSPEED…
    resumed_from_step: int = 0


def encode_pairs(rm: RewardModel, records: Sequence[PairRecord],
                 counts: TruncationCounts | None = None) -> list[EncodedPair]:
    """Both answers of every pair. With decoder formatting a pair's prompt is cut once, for
    its longer answer (``Formatter.encode_group``), so the two share it token for token;
    pair-template (encoder) sequences are cut each on its own. A pairwise model's two
    sequences are the pair in both orders (``Formatter.encode_comparison``)."""
    f = rm.formatter
    out = []
    for r in records:
        if rm.pairwise:  # the two orders: chosen as A, then as B
            first = f.encode_comparison(r.prompt, r.chosen, r.rejected)
            second = f.encode_comparison(r.prompt, r.rejected, r.chosen)
        elif f.has_prompt_split:
            first, second = f.encode_group(r.prompt, [r.chosen, r.rejected])
        else:
            first, second = f.encode(r.prompt, r.chosen), f.encode(r.prompt, r.rejected)
        if counts is not None:
            counts.add(first)
            counts.add(second)
        out.append(EncodedPair(first, second, r.label == "tie"))
    return out


def global_batches(pairs: Sequence[EncodedPair], batch_size: int, epoch: int, seed: int,
                   megabatch_factor: int) -> list[list[int]]:
    """Length-grouped batches of pair indices for one epoch; depends on (seed, epoch) only."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    mega = batch_size * megabatch_factor
    batches: list[list[int]] = []
    for s in range(0, len(order), mega):
        group = sorted(order[s:s + mega], key=lambda i: pairs[i].length, reverse=True)
        batches += [group[k:k + batch_size] for k in range(0, len(group), batch_size)]
    # Short batches (one per mega-batch at most) go last, so every other step is full.
    full = [b for b in batches if len(b) == batch_size]
    short = [b for b in batches if len(b) < batch_size]
    rng.shuffle(full)
    return full + short


def split(items: Sequence[int], parts: int) -> list[list[int]]:
    """Split into ``parts`` contiguous pieces whose sizes differ by at most one."""
    q, r = divmod(len(items), parts)
    out, s = [], 0
    for k in range(parts):
        n = q + (1 if k < r else 0)
        out.append(list(items[s:s + n]))
        s += n
    return out


class ChunkedRewards(nn.Module):
    """Scores a list of padded chunks in one ``forward`` (so DDP sees a single call)."""

    def __init__(self, rm: RewardModel) -> None:
        super().__init__()
        self.model = rm.model
        self.rm = rm
        # FSDP's transformer auto-wrap looks for the layer classes on the module it wraps
        inner = rm.model.get_base_model() if hasattr(rm.model, "get_base_model") else rm.model
        self._no_split_modules = getattr(inner, "_no_split_modules", None)

    def forward(self, chunks: list[Batch | PackedBatch]) -> torch.Tensor:  # type: ignore[override]
        device = next(self.model.parameters()).device
        return torch.cat([packed_rewards(self.model, c.to(device)) if isinstance(c, PackedBatch)
                          else self.rm.outputs(c.to(device), self.model) for c in chunks])


def micro_batch(rm: RewardModel, pairs: Sequence[EncodedPair], chunk_rows: int,
                prefix_sharing: bool = False, max_pack_tokens: int = 2048,
                ) -> tuple[list[Batch | PackedBatch], torch.Tensor, torch.Tensor]:
    """Chunks of length-sorted rows (``chunk_rows`` answers each), the permutation back to
    (first…, second…) order, and the tie mask. A row is one sequence, or with
    ``prefix_sharing`` one pack: a prompt and every answer to it in this micro-batch
    (``crome.packing``)."""
    seqs = [p.first for p in pairs] + [p.second for p in pairs]
    chunks: list[Batch | PackedBatch]
    if prefix_sharing:
        # a chunk holds up to chunk_rows answers (at least one pack): the plain path's unit
        packs = sorted(build_packs(seqs, max_pack_tokens), key=lambda p: p.length)
        chunks = [collate_for(rm, g) for g in chunk_packs(packs, chunk_rows)]
        order = [i for p in packs for i in p.members]
    else:
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        chunks = [rm.formatter.collate([seqs[i] for i in order[s:s + chunk_rows]])
                  for s in range(0, len(order), chunk_rows)]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    is_tie = torch.tensor([p.is_tie for p in pairs], dtype=torch.bool)
    return chunks, inverse, is_tie


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing on the backbone's layers (non-reentrant). Under LoRA the
    frozen embeddings' outputs are made to require grad, or no gradient would reach the
    adapters through the recomputed layers."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if inner is not model:
        inner.enable_input_require_grads()


def _latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / "checkpoints").glob("step-*"),
                   key=lambda p: int(p.name.split("-")[1]))
    ckpts = [c for c in ckpts if (c / STATE_FILE).exists()]
    return ckpts[-1] if ckpts else None


def train(records: Sequence[PairRecord], options: TrainOptions | None = None,
          eval_records: Sequence[PairRecord] | None = None) -> TrainSummary:
    """Train an RM on ``records`` (preferences and ties) and save it to ``output_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_linear_schedule_with_warmup

    opts = options or TrainOptions()
    out = Path(opts.output_dir)
    # The scheduler is stepped once per global step by us; accelerate would otherwise step it
    # once per process on each call.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False)
    world = accelerator.num_processes
    rank = accelerator.process_index
    main = accelerator.is_main_process
    parts_per_step = world * opts.grad_accum
    if opts.batch_size < parts_per_step:
        raise ValueError(f"batch_size {opts.batch_size} is smaller than processes × "
                         f"grad_accum = {parts_per_step}")
    _check_distributed(accelerator, opts, eval_records)
    set_seed(opts.seed)
    bf16 = resolve_bf16(opts.bf16)
    if opts.model.pairwise and (opts.margin or opts.center_coef):
        raise ValueError("margin and reward centering are Bradley–Terry options; a pairwise "
                         "model is trained with cross-entropy on its verdicts")
    # the seed varies everything random: the new head's and LoRA's initial weights too
    rm = RewardModel.create(replace(opts.model, seed=opts.seed))
    if not opts.center_coef and not rm.pairwise:  # a verdict head's bias is its class prior
        freeze_head_bias(rm.model)
    if opts.gradient_checkpointing:
        enable_gradient_checkpointing(rm.model)
    sharing = resolve_prefix_sharing(rm, opts.prefix_sharing)
    pack_tokens = opts.max_pack_tokens or 2 * opts.model.max_length
    counts = TruncationCounts()
    pairs = encode_pairs(rm, records, counts)
    if not pairs:
        raise ValueError("no training pairs")

    steps_per_epoch = math.ceil(len(pairs) / opts.batch_size)
    horizon = math.ceil(steps_per_epoch * opts.epochs)  # the LR schedule's length
    total_steps = horizon if opts.max_steps is None else min(horizon, opts.max_steps)
    params = [p for p in rm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, weight_decay=opts.weight_decay)
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(opts.warmup_ratio * horizon), horizon)
    wrapper = ChunkedRewards(rm)
    wrapper, optimizer, scheduler = accelerator.prepare(wrapper, optimizer, scheduler)

    start_step = 0
    if opts.resume:
        ckpt = _latest_checkpoint(out)
        if ckpt is not None:
            accelerator.load_state(str(ckpt))
            start_step = json.loads((ckpt / STATE_FILE).read_text())["step"]
            accelerator.print(f"resumed from {ckpt} (step {start_step})")

    summary = TrainSummary(pairs=len(pairs), ties=sum(p.is_tie for p in pairs),
                           num_processes=world, resumed_from_step=start_step,
                           truncation=asdict(counts), prefix_sharing=sharing,
                           distributed=str(accelerator.distributed_type.value))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        accelerator.print(f"training on {len(pairs)} pairs ({summary.ties} ties), "
                          f"{total_steps} steps of {opts.batch_size} pairs, {world} process(es); "
                          f"bf16 {'on' if bf16 else 'off'}, dropout "
                          f"{'on' if opts.model.dropout else 'off'}, prefix sharing "
                          f"{'on' if sharing else 'off'}, gradient checkpointing "
                          f"{'on' if opts.gradient_checkpointing else 'off'}; "
                          f"truncation: {counts.summary()}")
    log_fh = open(out / LOG_FILE, "a", encoding="utf-8") if main else None
    progress = _progress(main and opts.progress, total_steps, start_step)
    rm.model.train()
    t0 = time.perf_counter()
    trained_pairs = 0
    step = start_step
    loss_value: float | None = None
    epoch = start_step // steps_per_epoch
    batches = global_batches(pairs, opts.batch_size, epoch, opts.seed, opts.megabatch_factor)
    pos = start_step % steps_per_epoch
    while step < total_steps:
        if pos >= len(batches):
            epoch += 1
            pos = 0
            batches = global_batches(pairs, opts.batch_size, epoch, opts.seed,
                                     opts.megabatch_factor)
        gbatch = batches[pos]
        pos += 1
        if len(gbatch) < world:
            summary.skipped_tail_pairs += len(gbatch)
            step += 1
            scheduler.step()
            continue
        # This process's share of the global batch, then its accumulation micro-batches.
        mine = split(gbatch, world)[rank]
        micros = [m for m in split(mine, opts.grad_accum) if m]
        step_loss = torch.zeros((), device=accelerator.device)
        for k, micro in enumerate(micros):
            chunks, inverse, is_tie = micro_batch(rm, [pairs[i] for i in micro],
                                                  opts.chunk_rows, sharing, pack_tokens)
            sync = k == len(micros) - 1
            ctx = accelerator.no_sync(wrapper) if not sync else nullcontext()
            with ctx:
                with autocast(bf16, accelerator.device.type):
                    rewards = wrapper(chunks)
                rewards = rewards.float()[inverse.to(rewards.device)]
                m = len(micro)
                ties = is_tie.to(rewards.device)
                if rm.pairwise:
                    loss = preference(rewards[:m], rewards[m:], ties,
                                      tie_weight=opts.tie_weight)
                else:
                    loss = pair_loss(rewards[:m], rewards[m:], ties, tie_weight=opts.tie_weight,
                                     margin=opts.margin, center_coef=opts.center_coef)
                loss = loss * world / len(gbatch)
                accelerator.backward(loss)
            step_loss += loss.detach() / world
            for c in chunks:
                summary.real_tokens += c.real_tokens
                summary.padded_tokens += int(c.input_ids.numel())
            if sharing:
                summary.shared_tokens += sum(len(pairs[i].first) + len(pairs[i].second)
                                             for i in micro) - sum(c.real_tokens for c in chunks)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        trained_pairs += len(gbatch)
        loss_value = float(accelerator.reduce(step_loss, reduction="sum"))
        if progress is not None:
            progress.advance(info=f"loss {loss_value:.4f}")
        if log_fh is not None and (step % opts.log_every == 0 or step == total_steps):
            log_fh.write(json.dumps({"step": step, "epoch": round(step / steps_per_epoch, 4),
                                     "loss": loss_value,
                                     "lr": scheduler.get_last_lr()[0]}) + "\n")
            log_fh.flush()
        if opts.eval_every and eval_records and step % opts.eval_every == 0:
            summary.evals.append(_periodic_eval(accelerator, rm, eval_records, step))
        if opts.checkpoint_every and step % opts.checkpoint_every == 0 and (
                step < total_steps or opts.max_steps is not None):
            _checkpoint(accelerator, out, step, opts.keep_checkpoints)
    accelerator.wait_for_everyone()
    elapsed = time.perf_counter() - t0
    if progress is not None:
        progress.close()
    if log_fh is not None:
        log_fh.close()
    summary.steps = step
    summary.epochs = round(step / steps_per_epoch, 4)
    summary.seconds = round(elapsed, 3)
    summary.pairs_per_second = round(trained_pairs / elapsed, 3) if elapsed else 0.0
    summary.final_loss = loss_value
    # Token counts are per process; add them up for the whole run.
    tokens = accelerator.reduce(torch.tensor([summary.real_tokens, summary.padded_tokens,
                                              summary.shared_tokens],
                                             dtype=torch.float64), reduction="sum")
    summary.real_tokens, summary.padded_tokens, summary.shared_tokens = (
        int(tokens[0]), int(tokens[1]), int(tokens[2]))
    summary.non_padding_fraction = (round(summary.real_tokens / summary.padded_tokens, 4)
                                    if summary.padded_tokens else 1.0)
    if eval_records and (not summary.evals or summary.evals[-1]["step"] != step):
        summary.evals.append(_periodic_eval(accelerator, rm, eval_records, step))
    # Every process takes part in gathering the weights (FSDP, ZeRO-3 hold shards); the main
    # one saves them, the reward head with the rest.
    state = {k.removeprefix("model."): v
             for k, v in accelerator.get_state_dict(wrapper).items()}
    if main:
        rm.model = accelerator.unwrap_model(wrapper).model
        rm.meta.extra["train_options"] = asdict(opts)
        rm.save(out, card=False, state_dict=state)
        (out / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=2) + "\n")
        write_model_card(out, rm.meta, summary, data_counts(records),
                         summary.evals[-1] if summary.evals else None)
    accelerator.wait_for_everyone()
    return summary


def sharded(accelerator: Any) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, DeepSpeed ZeRO-3)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    return kind == DistributedType.FSDP or (
        kind == DistributedType.DEEPSPEED
        and accelerator.state.deepspeed_plugin.zero_stage == 3)


def _check_distributed(accelerator: Any, opts: TrainOptions,
                       eval_records: Sequence[PairRecord] | None) -> None:
    import os

    from accelerate.utils import DistributedType

    for kind in ("FSDP", "DEEPSPEED"):
        if (os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"
                and accelerator.distributed_type.value != kind):
            accelerator.print(f"note: the launch config asks for {kind}, which accelerate runs "
                              f"on GPUs only; this run is {accelerator.distributed_type.value}: "
                              "every process holds the whole model (data parallel)")
    if eval_records and sharded(accelerator):
        raise ValueError("held-out evaluation during training needs whole weights on the main "
                         "process; under FSDP or ZeRO-3 each holds a shard: train without "
                         "--eval-data and run crome eval on the saved model")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        gas = accelerator.state.deepspeed_plugin.deepspeed_config.get(
            "gradient_accumulation_steps")
        if gas not in (opts.grad_accum, "auto"):
            raise ValueError(f"DeepSpeed accumulates {gas} micro-batches per step but "
                             f"--grad-accum is {opts.grad_accum}: make them equal")


def _periodic_eval(accelerator: Any, rm: RewardModel, records: Sequence[PairRecord],
                   step: int) -> dict[str, Any]:
    """Held-out accuracy on the main process (others wait); ties count as wrong."""
    result: dict[str, Any] = {"step": step}
    if accelerator.is_main_process:
        chosen, rejected = score_pairs(rm, records, ScoreOptions(batch_size=64))
        result["accuracy"] = overall_accuracy(pair_outcomes(records, chosen, rejected))
        result["n"] = len(records)
        accelerator.print(f"step {step}: eval accuracy {result['accuracy']:.4f} "
                          f"on {len(records)} pairs")
    accelerator.wait_for_everyone()
    return result


def _checkpoint(accelerator: Any, out: Path, step: int, keep: int) -> None:
    """Model, optimizer, scheduler and RNG state (accelerate), plus the step reached."""
    import shutil

    ckpt = out / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(ckpt))
    if accelerator.is_main_process:
        (ckpt / STATE_FILE).write_text(json.dumps({"step": step}) + "\n")
        ckpts = sorted((out / "checkpoints").glob("step-*"),
                       key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _progress(enabled: bool, total: int, done: int) -> StageProgress | None:
    return StageProgress("train", total, done) if enabled else None
