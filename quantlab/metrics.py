"""Metric tables as parquet in the store: fixed arrow schemas, append-only, hive-partitioned.

    <store>/metrics/<table>/date=<YYYY-MM-DD>/<run_id>-<part>.parquet

Each writer writes whole files once, under names unique to (run, part): two runs never touch
the same file, and a retried step rewrites its own file with the same rows (so every QAT epoch
appears exactly once). Any parquet reader opens the tables without quantlab:

    pyarrow.parquet.read_table("<store>/metrics/evaluations")
    duckdb.sql("select * from read_parquet('<store>/metrics/evaluations/**/*.parquet', hive_partitioning=true)")
"""

from __future__ import annotations

import io
import re
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from quantlab.errors import StoreError
from quantlab.store import Store

_TS = pa.timestamp("us", tz="UTC")

SCHEMAS: dict[str, pa.Schema] = {
    "evaluations": pa.schema([
        ("run_id", pa.string()), ("variant", pa.string()),
        ("method", pa.string()),            # float | ptq | qat
        ("model", pa.string()), ("backend", pa.string()), ("engine", pa.string()),
        ("algorithms", pa.string()),        # e.g. minmax+cle+bc (VariantConfig.algorithms)
        ("runtime", pa.string()),           # torch-x86, torch-onednn, onnxruntime, openvino, ..
        ("format", pa.string()),            # torchscript | aoti | onnx | openvino
        ("top1", pa.float64()), ("top5", pa.float64()),  # percent, 0-100
        ("loss", pa.float64()),             # top-5 and loss: of the artifact's own evaluation
        ("num_images", pa.int64()), ("size_bytes", pa.int64()),
        ("agreement", pa.float64()),        # % of images with the variant's own artifact's top-1
        ("float_agreement", pa.float64()),  # % of images with float's top-1
        ("sqnr_db", pa.float64()),          # logits against float's, dB
        ("equivalent", pa.bool_()),         # an export passed its check (null: the artifact)
        ("created_at", _TS),
    ]),
    "benchmarks": pa.schema([
        ("run_id", pa.string()), ("variant", pa.string()), ("model", pa.string()),
        ("backend", pa.string()),            # eager | pt2e (null: not a quantlab variant)
        ("engine", pa.string()),
        ("runtime", pa.string()),            # quantlab.runtimes: torch-x86, aoti, onnxruntime, ..
        ("format", pa.string()),             # torchscript | aoti | onnx | openvino
        ("input_size", pa.int64()),
        ("batch_size", pa.int64()), ("num_threads", pa.int64()),
        ("latency_ms", pa.float64()),        # median
        ("latency_ms_p90", pa.float64()), ("latency_ms_min", pa.float64()),
        ("images_per_sec", pa.float64()),
        ("iterations", pa.int64()),
        ("noise", pa.float64()),             # half the p10-p90 spread of per-round medians / median
        ("noisy", pa.bool_()),               # noise or p90/median above bench's thresholds
        ("attempts", pa.int64()),            # measurements of the setting (noisy ones repeat)
        ("num_threads_requested", pa.int64()),  # > num_threads: capped to the idle CPUs
        ("load_avg_1m", pa.float64()),       # the machine's load average when timing began
        ("cpus_available", pa.int64()), ("idle_cpus", pa.float64()),  # sched_getaffinity; idle
        ("cpu", pa.string()),                # "model [int8 ISA flags]"
        ("cpu_avx2", pa.bool_()), ("cpu_avx512_vnni", pa.bool_()),  # int8 dot-product ISA:
        ("cpu_amx", pa.bool_()),             # VNNI/AMX are what make int8 several times faster
        ("source", pa.string()),             # quantlab (its artifact path) | torch (plain torch)
        ("optimisation", pa.string()),       # script | freeze | optimize_for_inference
        ("channels_last", pa.bool_()),
        ("weights", pa.string()),            # checkpoint | random
        ("calibration", pa.string()),        # dataset | random
        ("size_bytes", pa.int64()),          # the TorchScript file; null if not serializable
        ("load_ms", pa.float64()),           # torch.jit.load, fresh process; null: not measured
        ("peak_rss_mb", pa.float64()),       # peak RSS of load + inference, fresh process
        ("peak_rss_delta_mb", pa.float64()), # that peak above the RSS before loading
        ("torch_version", pa.string()),
        ("created_at", _TS),
    ]),
    "qat_epochs": pa.schema([
        ("run_id", pa.string()),
        ("variant", pa.string()), ("backend", pa.string()),  # qat-x86 eager, qat-pt2e-x86 pt2e
        ("epoch", pa.int64()), ("world_size", pa.int64()),
        ("train_loss", pa.float64()), ("train_top1", pa.float64()),
        ("eval_top1", pa.float64()),         # of the converted int8 model
        ("eval_top5", pa.float64()),
        ("observer_frozen", pa.bool_()), ("bn_frozen", pa.bool_()),
        ("lr", pa.float64()), ("seconds", pa.float64()), ("images_per_sec", pa.float64()),
        ("created_at", _TS),
    ]),
    # One layer quantized alone, the rest float (method: quantlab/sensitivity.py).
    "sensitivity": pa.schema([
        ("run_id", pa.string()), ("variant", pa.string()), ("model", pa.string()),
        ("rank", pa.int64()),                # 1 = most sensitive
        ("layer", pa.string()),              # module path in the fused float model
        ("op_type", pa.string()), ("num_params", pa.int64()),
        ("top1", pa.float64()),              # percent, on the sensitivity subset
        ("top1_drop", pa.float64()),         # float top-1 on the subset minus top1, points
        ("layer_sqnr_db", pa.float64()), ("output_sqnr_db", pa.float64()),
        ("num_images", pa.int64()), ("created_at", _TS),
    ]),
}

_PART = re.compile(r"^[A-Za-z0-9._-]+$")


def now() -> datetime:
    return datetime.now(timezone.utc)


def table_path(table: str) -> str:
    if table not in SCHEMAS:
        raise ValueError(f"unknown metric table {table!r}; valid: {', '.join(SCHEMAS)}")
    return f"metrics/{table}"


def write_rows(store: Store, table: str, rows: list[dict[str, Any]], run_id: str, part: str,
               run_date: datetime) -> str:
    """Write rows as one parquet file, named by run and part; returns its relative path.

    `run_date` (the run's creation time) picks the partition, so a resumed run writes into
    the same file as its first attempt. Rows are validated against the table's schema:
    a missing or mistyped column is an error, never a silent null.
    """
    schema = SCHEMAS[table.split("/")[-1]] if table in SCHEMAS else None
    if schema is None:
        raise ValueError(f"unknown metric table {table!r}; valid: {', '.join(SCHEMAS)}")
    if not _PART.match(part) or not _PART.match(run_id):
        raise ValueError(f"bad metric file name {run_id}-{part}")
    for row in rows:
        missing = [f.name for f in schema if f.name not in row and f.name != "created_at"]
        extra = [k for k in row if k not in schema.names]
        if missing or extra:
            raise ValueError(f"{table} row: missing {missing}, unknown {extra}")
    stamp = now()
    rows = [{"created_at": stamp, **row} for row in rows]
    try:
        arrow = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"{table} rows do not fit the schema: {e}") from None
    buf = io.BytesIO()
    pq.write_table(arrow, buf, compression="zstd")
    rel = f"{table_path(table)}/date={run_date:%Y-%m-%d}/{run_id}-{part}.parquet"
    store.write_bytes(rel, buf.getvalue())
    return rel


def read_table(store: Store, table: str, run_id: str | None = None) -> pa.Table:
    """The whole table (optionally one run's rows), with the hive `date` column.

    Read with the table's current schema: rows of files written before a column existed
    have nulls in it.
    """
    base = table_path(table)
    if not store.exists(base):
        return SCHEMAS[table].empty_table()
    try:
        # The table's schema, not the first file's: files written before a column was added
        # read with nulls there, instead of hiding the column from every newer file.
        date = pa.schema([("date", pa.string())])
        dataset = pads.dataset(store.path(base), filesystem=store.arrow_filesystem(),
                               format="parquet", schema=SCHEMAS[table].append(date.field(0)),
                               partitioning=pads.partitioning(date, flavor="hive"),
                               exclude_invalid_files=False,
                               ignore_prefixes=[".", "_"])
        expr = (pads.field("run_id") == run_id) if run_id else None
        return dataset.to_table(filter=expr)
    except (OSError, pa.ArrowInvalid) as e:
        raise StoreError(f"cannot read metric table {store.uri(base)}: {e}") from None


def read_rows(store: Store, table: str, run_id: str | None = None) -> list[dict[str, Any]]:
    return read_table(store, table, run_id).to_pylist()
