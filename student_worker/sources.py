"""Where data rows come from: JSONL, Parquet, a `save_to_disk` directory, or `datasets.load_dataset`.

    rows = read_source(spec, spec.path, spec.split)   # [(where, {column: value}), ...]

Every source is local. `load_dataset` runs offline (HF_DATASETS_OFFLINE is set before `datasets`
is imported, and its config after) and may name only a local directory, or one of the text builders in
`LOAD_DATASET_BUILDERS` reading local `data_files`: nothing is ever downloaded, and no builder
that unpickles (pandas) can be named. Only the columns the spec names are read.
`where` tells a person which row a message is about: `file:line` for JSONL, `path [split] row i`
otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .config import LOAD_DATASET_BUILDERS, DataSpec

Row = tuple[str, dict[str, Any]]  # (where, the row's columns)


class DataError(ValueError):
    """A data source is missing, malformed, or does not fit the job."""


def source_format(spec: DataSpec, path: str) -> str:
    """`spec.format` with auto resolved from what `path` is (see DataSpec.format)."""
    if spec.format != "auto":
        return spec.format
    p = Path(path)
    if path in LOAD_DATASET_BUILDERS or (spec.data_files is not None and path == spec.path):
        return "load_dataset"
    if p.is_dir():
        return "saved" if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file() else "load_dataset"
    return "parquet" if p.suffix == ".parquet" else "jsonl"


def check_source(spec: DataSpec, field: str, path: str) -> None:
    """What can be checked without reading rows: the path exists as its format needs; for
    load_dataset, a builder name is one we allow and every data file is a local file."""
    fmt = source_format(spec, path)
    p = Path(path)
    if fmt in ("jsonl", "parquet") and not p.is_file():
        raise DataError(f"{field}: {path} is not a file")
    if fmt == "saved" and not p.is_dir():
        raise DataError(f"{field}: {path} is not a directory written by save_to_disk")
    if fmt == "load_dataset":
        if path not in LOAD_DATASET_BUILDERS and p.is_file():
            raise DataError(f"{field}: load_dataset reads a directory or a builder name, not one file ({path}): "
                            f"set data.format to jsonl or parquet, or give path json (csv, ...) with data_files")
        if path not in LOAD_DATASET_BUILDERS and not p.exists():
            raise DataError(f"{field}: {path} is neither a local file or directory nor one of the builders "
                            f"{', '.join(LOAD_DATASET_BUILDERS)}; Distillery never downloads data")
        for split, files in (spec.data_files or {}).items():
            for f in files:
                if not Path(f).is_file():
                    raise DataError(f"data.data_files.{split}: {f} is not a local file")
    if fmt != "load_dataset" and field == "data.path" and spec.data_files is not None:
        raise DataError(f"data.data_files is read by load_dataset, but {path} reads as {fmt}: set data.format")
    if spec.eval_split is not None and field == "data.path" and fmt in ("jsonl", "parquet"):
        raise DataError(f"data.eval_split {spec.eval_split!r}: {path} reads as a {fmt} file, which has no splits; "
                        "use data.eval_path")


def _columns(spec: DataSpec, available: list[str], where: str) -> list[str]:
    wanted = [c for c in (spec.prompt_field, spec.response_field, spec.messages_field) if c in available]
    if spec.prompt_field not in wanted and spec.messages_field not in wanted:
        raise DataError(f"{where} has neither a {spec.prompt_field!r} (data.prompt_field) nor a "
                        f"{spec.messages_field!r} (data.messages_field) column; its columns: "
                        f"{', '.join(available[:20])}")
    return wanted


def read_jsonl(path: str | Path) -> list[Row]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    rows: list[Row] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{n}: expected a JSON object")
            rows.append((f"{path}:{n}", obj))
    return rows


def _read_parquet(spec: DataSpec, path: str) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises its own error types for a file that is not Parquet
        raise DataError(f"{path}: not a Parquet file ({exc})") from None
    table = pq.read_table(path, columns=_columns(spec, names, path))
    return [(f"{path} row {i}", row) for i, row in enumerate(table.to_pylist())]


def _datasets():
    """`datasets`, imported offline: it never reaches a hub from a Distillery process. Only its own
    switch is set: HF_HUB_OFFLINE would also stop the model downloads `distillery train` allows."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.utils.logging.disable_progress_bar()
    return datasets


def _pick(ds: Any, path: str, split: str | None) -> tuple[Any, str]:
    """(rows, split name) of a DatasetDict; a plain Dataset is its only split, `train`. With no
    split asked for (eval_path), a source with one split gives that one."""
    if not isinstance(ds.column_names, dict):  # a Dataset, not a DatasetDict
        if split not in (None, "train"):
            raise DataError(f"{path} holds one unsplit dataset, not split {split!r}")
        return ds, "train"
    if split is None:
        if len(ds) != 1:
            raise DataError(f"{path} has several splits ({', '.join(ds)}); name one with data.eval_split on "
                            f"data.path instead of data.eval_path")
        split = next(iter(ds))
    if split not in ds:
        raise DataError(f"{path} has no split {split!r}; its splits: {', '.join(ds)}")
    return ds[split], split


def _rows_of(spec: DataSpec, ds: Any, where: str) -> list[Row]:
    ds = ds.select_columns(_columns(spec, list(ds.column_names), where))
    return [(f"{where} row {i}", row) for i, row in enumerate(ds.to_list())]


def _read_datasets(spec: DataSpec, path: str, fmt: str, split: str | None) -> list[Row]:
    datasets = _datasets()
    try:
        if fmt == "saved":
            ds = datasets.load_from_disk(path)
        else:
            data_files = None
            if path == spec.path and spec.data_files is not None:  # relative to the working directory
                data_files = {k: [os.path.abspath(f) for f in v] for k, v in spec.data_files.items()}
            ds = datasets.load_dataset(path, data_files=data_files)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for unreadable data; one message names the source
        raise DataError(f"{path}: cannot be read as a {fmt} dataset ({type(exc).__name__}: {exc})") from None
    rows, split = _pick(ds, path, split)
    return _rows_of(spec, rows, f"{path} [{split}]")


def read_source(spec: DataSpec, path: str, split: str | None) -> list[Row]:
    """Every row of `path`: of `split` for sources with splits (None: their only split)."""
    fmt = source_format(spec, path)
    if fmt == "jsonl":
        return read_jsonl(path)
    if fmt == "parquet":
        return _read_parquet(spec, path)
    return _read_datasets(spec, path, fmt, split)
