"""Ray Data stages around a pipeline: CPU preprocess tasks -> model actor pool -> CPU postprocess tasks.

    import ray
    from pipelines import run_pipeline

    ds = ray.data.read_parquet("s3://bucket/texts/")
    out = run_pipeline(ds, "sentence-embeddings", column="text")   # lazy: + an "embedding" column
    out.write_parquet("s3://bucket/embeddings/")

Each stage is the pipeline's own public step (`preprocess_item`, `run_model`, `postprocess_item`) over a
batch of rows. The CPU stages build the pipeline without weights (tokenizer and config only), once per
worker process; the model stage is an actor pool, each actor loads the weights once. Between stages a
row carries its features as one pickled binary cell, so a chunk pipeline's chunks stay in their row:
rows are 1:1 with the input. The stages take different resources, so Ray Data never fuses them.

The stage functions are plain callables on a `pyarrow.Table`, usable without Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch

from pipelines.batching import ItemOutOfMemoryError
from pipelines.convert import outputs_to_numpy, outputs_to_torch, to_plain
from pipelines.runtime import RuntimeConfig, positive_int

logger = logging.getLogger(__name__)

PARTS, ERROR, TOKENS = "__parts", "__error", "__tokens"
STAGE_TIME = {"preprocess": "__pre_s", "model": "__model_s", "postprocess": "__post_s"}
STAGE_WORKER = {"preprocess": "__pre_worker", "model": "__model_worker", "postprocess": "__post_worker"}
STATS_COLUMNS = (TOKENS, *STAGE_TIME.values(), *STAGE_WORKER.values())
ON_ERROR = ("raise", "record")


class RowError(RuntimeError):
    """One input row failed; the message names the row (its id, or its input) and the reason."""


@dataclass(frozen=True)
class RayTask:
    """How a task's answers land in a Ray Dataset and how its model actors are fed: the Ray layer's own knobs,
    which the pipeline classes know nothing of."""

    output_column: str  # the result column
    rows_per_batch: int = 4096  # rows per model call
    concurrent_batches: int = 1  # model calls one actor runs at once
    arrow_type: Callable[[dict], pa.DataType] | None = None  # postprocess params -> the answer's type; None: inferred


def _entities_type(post: dict) -> pa.DataType:
    """A list of entity structs; the fields depend on the aggregation (a text with no entity gives [])."""
    strategy = post.get("aggregation_strategy", "none")
    label = [("entity", pa.string())] if strategy == "none" else [("entity_group", pa.string())]
    index = [("index", pa.int64())] if strategy == "none" else []
    tail = [("word", pa.string()), ("start", pa.int64()), ("end", pa.int64())]
    return pa.list_(pa.struct(label + [("score", pa.float64())] + index + tail))


# task -> its Ray knobs; a task not listed (a registered one) writes "output" with the defaults.
RAY_TASKS: dict[str, RayTask] = {
    "text-classification": RayTask("classification"),
    "zero-shot-classification": RayTask("classification"),
    "token-classification": RayTask("entities", arrow_type=_entities_type),
    "question-answering": RayTask("answer"),
    "fill-mask": RayTask("fills"),
    "feature-extraction": RayTask("features"),
    "sentence-embeddings": RayTask("embedding"),
    # An actor runs 4 calls of 256 rows at once, all in one engine, so that it stays full while one call's last
    # sequences finish.
    "text-generation": RayTask("generated", rows_per_batch=256, concurrent_batches=4),
    # An image's features are its uint8 pixels (~150 KB at 224 x 224): 256 rows per model call, not 4096.
    "image-classification": RayTask("classification", rows_per_batch=256),
    "zero-shot-image-classification": RayTask("classification", rows_per_batch=256),
    "image-feature-extraction": RayTask("features", rows_per_batch=256),
    "image-embeddings": RayTask("embedding", rows_per_batch=256),
}


def ray_task(task: str) -> RayTask:
    return RAY_TASKS.get(task, RayTask("output"))


@dataclass(frozen=True)
class StageSpec:
    """Everything a stage needs to rebuild its copy of the pipeline on a worker (plain, picklable values)."""

    task: str
    model: str
    column: str | dict[str, str]  # the input column, or {input key: column} for dict inputs (QA, pairs)
    output_column: str
    error_column: str | None  # None: on_error="raise"
    id_column: str | None = None
    revision: str | None = None
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)  # how the model actors load and batch
    params: dict = field(default_factory=dict)  # the task's parameters
    stats: bool = False  # keep the per-row stats columns (jobs.infer sums them for its summary)
    keep_input: bool = True  # False: the preprocess stage drops the input column(s) once their features are made


# -- building pipelines, once per worker process ---------------------------------------------------------------
_CPU_PIPELINES: dict[str, Any] = {}


def cpu_pipeline(spec: StageSpec):
    """The weightless pipeline of a CPU stage, built once per process (Ray reuses task worker processes)."""
    key = repr(spec)  # the spec holds dicts: not hashable, but its repr is a faithful key
    if key not in _CPU_PIPELINES:
        from pipelines.factory import pipeline

        torch.set_num_threads(1)  # a CPU stage is one of many processes sharing the node
        _CPU_PIPELINES[key] = pipeline(spec.task, spec.model, revision=spec.revision, load_weights=False, **spec.params)
    return _CPU_PIPELINES[key]


def _worker() -> str:
    try:
        import ray

        node = ray.get_runtime_context().get_node_id()[:12] if ray.is_initialized() else "local"
    except ImportError:  # pragma: no cover - ray is a dependency
        node = "local"
    return f"{node}/{os.getpid()}"


def _row_name(table: pa.Table, spec: StageSpec, row: int) -> str:
    if spec.id_column is not None:
        return f"row {spec.id_column}={table.column(spec.id_column)[row].as_py()!r}"
    value = repr(_input(table, spec, row))
    return f"row with input {value[:80]}{'...' if len(value) > 80 else ''}"


def _input(table: pa.Table, spec: StageSpec, row: int):
    if not spec.keep_input and _input_columns(spec)[0] not in table.column_names:
        return f"#{row} of its batch"  # the input is gone after preprocess: name the row by its place
    return _inputs(table.slice(row, 1), spec)[0]


def _input_columns(spec: StageSpec) -> list[str]:
    return [spec.column] if isinstance(spec.column, str) else list(spec.column.values())


def _inputs(table: pa.Table, spec: StageSpec) -> list:
    if isinstance(spec.column, str):
        return _values(table.column(spec.column))
    columns = {key: _values(table.column(name)) for key, name in spec.column.items()}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def _values(column: pa.ChunkedArray) -> list:
    """A column's values as Python objects; a Ray tensor column (`ray.data.read_images`' "image", fixed or variable
    shape) as one numpy array per row, where to_pylist would give nested lists."""
    if isinstance(column.type, pa.ExtensionType) and "tensor" in type(column.type).__name__.lower():
        return [array for chunk in column.chunks for array in chunk.to_numpy(zero_copy_only=False)]
    return column.to_pylist()


def _reason(error: BaseException) -> str:
    cause = error.__cause__ if isinstance(error.__cause__, (TypeError, ValueError)) else error
    return f"{type(cause).__name__}: {cause}"


def _fail(table: pa.Table, spec: StageSpec, row: int, error: BaseException):
    raise RowError(f"{_row_name(table, spec, row)}: {_reason(error)}") from error


def _with(table: pa.Table, name: str, values, type=None) -> pa.Table:
    array = pa.array(values, type=type)
    index = table.schema.get_field_index(name)
    return table.set_column(index, name, array) if index >= 0 else table.append_column(name, array)


def _stamp(table: pa.Table, stage: str, start: float) -> pa.Table:
    """The stage's time for this batch, spread evenly over its rows, and which worker ran it."""
    rows = max(table.num_rows, 1)
    table = _with(table, STAGE_TIME[stage], [(time.perf_counter() - start) / rows] * table.num_rows, pa.float64())
    return _with(table, STAGE_WORKER[stage], [_worker()] * table.num_rows, pa.string())


# -- the three stages ----------------------------------------------------------------------------------------
def preprocess_batch(table: pa.Table, spec: StageSpec) -> pa.Table:
    """Features of every row (a list of forward passes each), pickled into one cell; bad rows get an error."""
    start = time.perf_counter()
    pipe = cpu_pipeline(spec)
    pre = pipe.call_parameters().preprocess
    cells, errors, tokens = [], [], []
    for row, item in enumerate(_inputs(table, spec)):
        try:
            parts = pipe.preprocess_item(item, row, pre)
        except Exception as e:  # noqa: BLE001 - any failure is this row's, reported with it
            if spec.error_column is None:
                _fail(table, spec, row, e)
            cells.append(None), errors.append(_reason(e)), tokens.append(0)
            continue
        cells.append(pickle.dumps(parts, protocol=5))
        errors.append(None)
        tokens.append(sum(pipe.feature_length(p) for p in parts))
    if not spec.keep_input:
        table = table.drop_columns([c for c in _input_columns(spec) if c != spec.id_column])
    table = _with(table, PARTS, cells, pa.binary())
    table = _with(table, ERROR, errors, pa.string())
    table = _with(table, TOKENS, tokens, pa.int64())
    return _stamp(table, "preprocess", start)


class ModelStage:
    """The model actor: loads the weights once, then runs batches of preprocessed rows through `run_model`.

    A failing batch is rerun row by row so that one bad row cannot take the others with it; a row that
    does not fit in memory even alone is that row's error. If every row of a batch fails alone too, the
    fault is not the rows' (a broken device): the batch fails, and Ray Data retries it on another actor.
    """

    def __init__(self, spec: StageSpec):
        from pipelines.factory import pipeline

        self.spec = spec
        runtime = spec.runtime.on_accelerator()  # the accelerator when the actor's node has one
        self.pipe = pipeline(spec.task, spec.model, revision=spec.revision, runtime=runtime, **spec.params)
        logger.info("model stage ready: %s on %s, %d threads", spec.model, self.pipe.device, torch.get_num_threads())

    def __call__(self, table: pa.Table) -> pa.Table:
        start = time.perf_counter()
        cells, errors = table.column(PARTS).to_pylist(), table.column(ERROR).to_pylist()
        rows = {row: pickle.loads(cell) for row, cell in enumerate(cells) if errors[row] is None}
        outputs, failures, last = self._run(rows, table)
        if len(rows) > 1 and not outputs:
            raise RuntimeError(f"every row of a batch of {len(rows)} failed in the model, even alone: {last}")
        for row in rows:
            if row in outputs:
                merged = [{**part, **outputs_to_numpy(out)} for part, out in zip(rows[row], outputs[row])]
                cells[row] = pickle.dumps(merged, protocol=5)
            else:
                cells[row], errors[row] = None, failures[row]
        table = _with(_with(table, PARTS, cells, pa.binary()), ERROR, errors, pa.string())
        return _stamp(table, "model", start)

    def _run(self, rows: dict[int, list], table: pa.Table) -> tuple[dict[int, list], dict[int, str], Exception | None]:
        """Model outputs per row: all rows in one call; on failure, each row alone. Also the failed rows'
        reasons and the last failure. Nothing is kept on self: calls may run on several threads at once."""
        failures, last = {}, None
        try:
            return self._call(rows), failures, last
        except ItemOutOfMemoryError:
            pass  # the row is found below, where it fails alone
        except Exception as e:  # noqa: BLE001 - isolated below, row by row
            logger.warning("a batch of %d rows failed (%s); running its rows one by one", len(rows), e)
        outputs = {}
        for row, parts in rows.items():
            try:
                outputs.update(self._call({row: parts}))
            except Exception as e:  # noqa: BLE001 - this row's failure
                if self.spec.error_column is None:
                    _fail(table, self.spec, row, e)
                failures[row], last = _reason(e), e
        return outputs, failures, last

    def _call(self, rows: dict[int, list]) -> dict[int, list]:
        features, owners = [], []
        for row, parts in rows.items():
            features.extend(parts)
            owners.extend([row] * len(parts))
        results = self.pipe.run_model(features) if features else []
        grouped: dict[int, list] = {row: [] for row in rows}
        for owner, result in zip(owners, results):
            grouped[owner].append(result)
        return grouped


def postprocess_batch(table: pa.Table, spec: StageSpec) -> pa.Table:
    """Each row's answer from its merged features and outputs, as an Arrow column (structs, lists, floats)."""
    start = time.perf_counter()
    pipe = cpu_pipeline(spec)
    post = pipe.call_parameters().postprocess
    arrow_type = ray_task(spec.task).arrow_type
    cells, errors = table.column(PARTS).to_pylist(), table.column(ERROR).to_pylist()
    answers = []
    for row, cell in enumerate(cells):
        if errors[row] is not None:
            answers.append(None)
            continue
        try:
            parts = [outputs_to_torch(part) for part in pickle.loads(cell)]
            answers.append(to_plain(pipe.postprocess_item(parts, post)))
        except Exception as e:  # noqa: BLE001 - this row's failure
            if spec.error_column is None:
                _fail(table, spec, row, e)
            answers.append(None), errors.__setitem__(row, _reason(e))
    table = table.drop_columns([PARTS])
    table = _with(table, spec.output_column, answers, answer_type(answers, arrow_type(post) if arrow_type else None))
    if spec.error_column is not None:
        table = _with(table, spec.error_column, errors, pa.string())
    table = table.drop_columns([ERROR])
    table = _stamp(table, "postprocess", start)
    return table if spec.stats else table.drop_columns(list(STATS_COLUMNS))


def answer_type(answers: list, declared: pa.DataType | None) -> pa.DataType | None:
    """The declared type, else the inferred one with float64 lists (embeddings, hidden states) as float32.

    Our models compute in float32 or lower, so the narrowing loses nothing and halves the column.
    """
    if declared is not None:
        return declared
    inferred = pa.array(answers).type
    return _float32_lists(inferred)


def _float32_lists(type: pa.DataType) -> pa.DataType:
    if pa.types.is_list(type):
        return pa.list_(_float32_lists(type.value_type))
    return pa.float32() if pa.types.is_float64(type) else type


# -- the plan ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resources:
    """Per-stage resources. The defaults fit a 2-core laptop as well as a GPU node: the CPU stages take
    fractions of a CPU so that they run beside the model actors, and the model actor gets the GPU."""

    num_gpus: float = 0.0  # per model actor
    concurrency: tuple[int, int] = (1, 1)  # model actors (min, max)
    model_cpus: float = 0.5  # per model actor (scheduling; its threads are `model_threads`)
    model_threads: int | None = None  # torch threads per model actor; None: the node's CPUs / max actors
    cpu_stage_cpus: float = 0.25  # per preprocess / postprocess task
    preprocess_concurrency: int | None = None  # max preprocess tasks; None: as many as resources allow
    postprocess_concurrency: int | None = None  # max postprocess tasks
    rows_per_batch: int = 4096  # rows per model call, length-sorted and micro-batched inside
    concurrent_batches: int = 1  # model calls running at once in each actor (generation: they share one engine)
    cpu_rows_per_batch: int = 256  # rows per preprocess / postprocess task


RESOURCE_OPTIONS = (
    "num_gpus",
    "concurrency",
    "preprocess_concurrency",
    "postprocess_concurrency",
    "rows_per_batch",
    "model_threads",
)


def run_pipeline(
    ds,
    task: str | None = None,
    *,
    model=None,
    column: str | dict[str, str] = "text",
    output_column: str | None = None,
    id_column: str | None = None,
    on_error: str = "raise",
    error_column: str = "error",
    revision: str | None = None,
    runtime: RuntimeConfig | None = None,
    stats: bool = False,
    keep_input: bool = True,
    **options,
):
    """Append the task's answer to every row of the Ray Dataset `ds` (lazy; rows 1:1, order not kept).

    column: the input column, or {input key: column} for dict inputs ({"question": "q", "context": "c"}).
    output_column: default the task's (`embedding`, `classification`, `entities`, `answer`, ...: RAY_TASKS).
    on_error: "raise" fails the job naming the row; "record" puts the reason in `error_column` (null when
    the row succeeded) and goes on. id_column names rows in errors. stats: keep per-row timing columns.
    keep_input: False drops the input column(s) in the preprocess stage, once their features are made (image
    bytes need not travel to the model actors nor land in the output; the id column stays).
    runtime: how the model actors load and batch (a RuntimeConfig: dtype, device_map, quantization, batch_size /
    max_batch_tokens (the micro-batch limits inside a model call), ...); its field names as plain keywords
    override it. The device is the actor's accelerator when its node has one, unless the runtime sets one.

    Resources, as keywords:
    num_gpus: per model actor (fractions allowed); default 1 when the cluster has GPUs, else 0 (CPU).
    concurrency: model actors, a number or (min, max) to autoscale; default (1, GPUs) or 1 on CPU.
    preprocess_concurrency / postprocess_concurrency: the most CPU tasks of each stage at once; default a
    quarter of the cluster's CPUs (one tokenizer task handles ~10k short rows/s; every extra task is one more
    process that imports torch and loads the tokenizer, which on a 2-core machine the model pays for).
    rows_per_batch: rows per model call (RAY_TASKS: 4096; 256 for text generation, whose actors run 4 calls at
    once on one engine so that it stays full while a call drains). model_threads: torch threads per model actor
    (default: the node's CPUs shared among its actors; the runtime's `threads` wins).

    The other keywords are the task's parameters (`top_k=`, `aggregation_strategy=`, ...).
    """
    import ray

    from pipelines import registry
    from pipelines.factory import split_runtime_options

    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    given = {k: options.pop(k) for k in RESOURCE_OPTIONS if k in options}
    runtime_options, task_params = split_runtime_options(options)
    runtime = (runtime or RuntimeConfig()).merged(**runtime_options)
    pipe = _validated(task, model, revision, task_params)  # fails here, on the driver, not in a worker
    knobs = ray_task(pipe.task)
    resources = _resources(
        ray,
        given.get("num_gpus"),
        given.get("concurrency"),
        (given.get("preprocess_concurrency"), given.get("postprocess_concurrency")),
        given.get("rows_per_batch") or knobs.rows_per_batch,
        runtime.threads or given.get("model_threads"),
    )
    spec = StageSpec(
        task=pipe.task,
        model=str(model if model is not None else registry.TASKS[pipe.task].default),
        column=column,
        output_column=output_column or knobs.output_column,
        error_column=error_column if on_error == "record" else None,
        id_column=id_column,
        revision=revision,
        runtime=runtime.merged(threads=resources.model_threads),
        params=task_params,
        stats=stats,
        keep_input=keep_input,
    )
    _check_columns(ds, spec)
    return plan(ds, spec, dataclasses.replace(resources, concurrent_batches=knobs.concurrent_batches))


def plan(ds, spec: StageSpec, res: Resources):
    """The three stages on `ds`; separate operators (different resources), streaming."""
    import ray.data

    cpu = dict(
        batch_format="pyarrow",
        batch_size=res.cpu_rows_per_batch,
        num_cpus=res.cpu_stage_cpus,
        udf_modifying_row_count=False,
    )
    ds = ds.map_batches(preprocess_batch, fn_kwargs={"spec": spec}, compute=_tasks(res.preprocess_concurrency), **cpu)
    ds = ds.map_batches(
        ModelStage,
        fn_constructor_kwargs={"spec": spec},
        compute=ray.data.ActorPoolStrategy(
            min_size=res.concurrency[0],
            max_size=res.concurrency[1],
            max_concurrent_calls_per_actor=res.concurrent_batches,
            enable_true_multi_threading=res.concurrent_batches > 1,
        ),
        batch_format="pyarrow",
        batch_size=res.rows_per_batch,
        num_cpus=res.model_cpus,
        num_gpus=res.num_gpus,
        udf_modifying_row_count=False,
    )
    return ds.map_batches(
        postprocess_batch, fn_kwargs={"spec": spec}, compute=_tasks(res.postprocess_concurrency), **cpu
    )


def _tasks(size: int | None):
    import ray.data

    return ray.data.TaskPoolStrategy(size=size) if size else None


def _validated(task, model, revision, task_params):
    """The weightless pipeline on the driver: unknown tasks, models and parameters fail before any work."""
    from pipelines.factory import pipeline

    return pipeline(task, model, revision=revision, load_weights=False, **task_params)


def _check_columns(ds, spec: StageSpec) -> None:
    schema = ds.schema()
    names = list(schema.names) if schema is not None else []
    wanted = [spec.column] if isinstance(spec.column, str) else list(spec.column.values())
    if spec.id_column is not None:
        wanted.append(spec.id_column)
    for name in wanted:
        if names and name not in names:
            raise KeyError(f"the dataset has no column {name!r}; its columns: {names}")
    for name in (spec.output_column, spec.error_column):
        if name is not None and name in names:
            raise ValueError(
                f"the output column {name!r} is already an input column; pass output_column= / error_column="
            )


def _resources(ray, num_gpus, concurrency, cpu_concurrency, rows_per_batch, model_threads) -> Resources:
    cluster = ray.cluster_resources() if ray.is_initialized() else {}
    cpu_tasks = max(1, int(cluster.get("CPU", os.cpu_count() or 1) // 4))
    pre, post = (
        cpu_tasks if n is None else positive_int(name, n)
        for name, n in zip(("preprocess_concurrency", "postprocess_concurrency"), cpu_concurrency)
    )
    gpus = cluster.get("GPU", 0)
    if num_gpus is None:
        num_gpus = 1.0 if gpus else 0.0
    if num_gpus < 0:
        raise ValueError(f"num_gpus must be >= 0, got {num_gpus}")
    if concurrency is None:
        concurrency = (1, max(1, int(gpus / num_gpus))) if num_gpus else (1, 1)
    elif isinstance(concurrency, int):
        concurrency = (concurrency, concurrency)
    low, high = concurrency
    if not 1 <= low <= high:
        raise ValueError(f"concurrency must be n >= 1 or (min, max) with 1 <= min <= max, got {concurrency!r}")
    if model_threads is None and not num_gpus:
        nodes = max(1, sum(1 for n in ray.nodes() if n.get("Alive"))) if ray.is_initialized() else 1
        cpus = cluster.get("CPU", os.cpu_count() or 1)
        model_threads = max(1, int(cpus / nodes / max(1, -(-high // nodes))))  # the node's CPUs / its actors
    return Resources(
        num_gpus=num_gpus,
        concurrency=(low, high),
        model_cpus=1.0 if num_gpus else 0.5,
        model_threads=model_threads,
        preprocess_concurrency=pre,
        postprocess_concurrency=post,
        rows_per_batch=positive_int("rows_per_batch", rows_per_batch),
    )
