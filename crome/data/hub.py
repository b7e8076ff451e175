"""``hf:`` data: a Hugging Face ``datasets`` set by Hub name, or a local copy of one.

- ``hf:ORG/NAME[:SPLIT]``: ``datasets.load_dataset(ORG/NAME, split=SPLIT or "train")``, from
  the Hub or from the local ``datasets`` cache;
- ``hf:/path/folder[:SPLIT]``: a ``save_to_disk`` folder (``load_from_disk``; a DatasetDict
  needs the split, since picking one silently could evaluate on training data), or else a
  folder of data files such as a cloned Hub repository (``load_dataset(folder)``);
- ``hf:/path/file.parquet`` (or any pair file): read like ``--data file``.

Rows go through the same layout adapters and validation loop as files
(:func:`crome.data.io.iter_dataset`), so a Hub set in TRL's layout reads like the same rows
in a JSONL file. Whatever ``datasets`` or the Hub raise (no network, offline mode, a private
or missing set, a wrong split) becomes one ``ValueError`` line naming the set: the command
line turns it into ``crome: error: …`` instead of a traceback several screens long.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crome.data.io import ReadReport, iter_dataset, iter_pairs
from crome.data.schema import PairRecord

PREFIX = "hf:"
_LOCAL_STARTS = ("/", "./", "../", "~", ".\\", "..\\")
_MESSAGE_CHARS = 300


def parse_spec(spec: str) -> tuple[str, str | None]:
    """(dataset name or path, split or None) of ``hf:TARGET[:SPLIT]``.

    An existing path wins over a split suffix, so a local path holding ``:`` still works.
    """
    body = spec.removeprefix(PREFIX)
    if not body:
        raise ValueError(f"{spec!r}: name a dataset, hf:ORG/NAME[:SPLIT] or "
                         f"hf:/path/to/saved[:SPLIT]")
    if Path(body).expanduser().exists():
        return body, None
    target, sep, split = body.rpartition(":")
    if sep and target and split and not any(c in split for c in "/\\"):
        return target, split
    return body, None


def _is_local(target: str) -> bool:
    return target.startswith(_LOCAL_STARTS) or Path(target).expanduser().exists()


def hub_label(spec: str) -> str:
    """A short name for results: the Hub name as given, or the local folder's or file's name
    (with the split)."""
    target, split = parse_spec(spec)
    if _is_local(target):
        path = Path(target).expanduser()
        target = path.stem if path.is_file() else path.name
    return target + (f":{split}" if split else "")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no message"
    if len(text) > _MESSAGE_CHARS:
        text = text[:_MESSAGE_CHARS] + "…"
    return f"{type(exc).__name__}: {text}"


def _offline_hint() -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("HF_DATASETS_OFFLINE", "")
    if offline.strip().lower() in ("1", "true", "yes", "on"):
        return ("; offline mode is on (HF_HUB_OFFLINE=1): run with HF_HUB_OFFLINE=0 to "
                "download, or pass a save_to_disk copy as hf:/path/to/folder")
    return ""


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:  # pragma: no cover - a dependency of crome
        raise ValueError("hf: data needs the `datasets` package: pip install datasets") from None
    return datasets


def _from_hub(name: str, split: str | None, label: str) -> Any:
    datasets = _datasets()
    try:
        return datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # noqa: BLE001 -- network, auth, missing set or split: one line
        raise ValueError(f"{label}: cannot load it from the Hugging Face Hub "
                         f"({_one_line(e)}){_offline_hint()}") from None


def _from_folder(path: Path, split: str | None, label: str) -> Any:
    """``label`` is ``hf:PATH`` without the split, for the errors."""
    datasets = _datasets()
    if not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        # Not a save_to_disk folder: a folder of data files (a cloned Hub repository).
        try:
            return datasets.load_dataset(str(path), split=split or "train")
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{label}: neither a save_to_disk folder nor a folder of data "
                             f"files that datasets can load ({_one_line(e)})") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{label}: cannot load it with load_from_disk ({_one_line(e)})") \
            from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{label}: a DatasetDict with splits {', '.join(ds)}; name one "
                             f"as {label}:SPLIT")
        if split not in ds:
            raise ValueError(f"{label}: no split {split!r}; it has {', '.join(ds)}")
        return ds[split]
    if split is not None:
        raise ValueError(f"{label}: a single Dataset without splits; drop ':{split}'")
    return ds


def iter_hub_pairs(spec: str, *, skip_invalid: bool = False,
                   report: ReadReport | None = None) -> Iterator[PairRecord]:
    """Validated records of ``hf:…`` (see the module doc); errors name ``hf:TARGET[:SPLIT]``
    and the record number."""
    report = report if report is not None else ReadReport()
    target, split = parse_spec(spec)
    label = f"{PREFIX}{target}" + (f":{split}" if split else "")
    if _is_local(target):
        path = Path(target).expanduser()
        if not path.exists():
            raise ValueError(f"{label}: no such file or folder")
        if path.is_file():
            if split is not None:
                raise ValueError(f"{PREFIX}{target}: a file has no splits; drop ':{split}'")
            yield from iter_pairs(path, skip_invalid=skip_invalid, report=report)
            return
        ds = _from_folder(path, split, f"{PREFIX}{target}")
    else:
        ds = _from_hub(target, split, label)
    report.path = label
    yield from iter_dataset(ds, skip_invalid=skip_invalid, report=report)
