"""Accelerate configs for ``crome train`` on several GPUs (and the CPU test of sharding).

``crome launch-config NAME`` prints a config's path, for ``accelerate launch --config_file``:

* ``ddp``: data parallel, one full copy per GPU (what ``--multi_gpu`` gives);
* ``fsdp``: FSDP2, parameters, gradients and optimizer state sharded, one unit per decoder
  layer (the model's ``_no_split_modules``), full state dict gathered on rank 0 for saving;
* ``zero2``: DeepSpeed ZeRO-2 (optimizer state and gradients sharded);
* ``zero3``: DeepSpeed ZeRO-3 (parameters too), 16-bit weights gathered for saving.

All are for 8 GPUs on one machine in bf16; ``--num_processes`` and ``--mixed_precision`` on
the ``accelerate launch`` line override them. How ``crome train`` behaves under each (the
reward head, saving, evaluation, accumulation) is in ``crome/train.py``'s docstring.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = ("ddp", "fsdp", "zero2", "zero3")


def config_path(name: str) -> Path:
    if name not in CONFIGS:
        raise ValueError(f"unknown launch config {name!r}; known: {', '.join(CONFIGS)}")
    return Path(__file__).with_name(f"{name}.yaml")
