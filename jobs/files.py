"""Reading inputs and writing results for jobs.infer: Ray Data readers, atomic part files, resume.

Every output (results and errors) is a folder of part files written by Ray Data tasks. A part file is
written under a hidden temporary name and renamed when complete, so a killed job leaves only whole
files behind. The completed part files are therefore their own manifest: `--resume` reads the id
column of every part file already there and skips those rows. (Ray Data's own checkpointing, beta in
2.60, keeps a separate checkpoint next to the output; a job killed between writing a block and
checkpointing it writes that block twice on rerun. Here there is nothing to disagree with.)
"""

from __future__ import annotations

import glob
import io
import json
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

INPUT_FORMATS = {
    "parquet": (".parquet",),
    "jsonl": (".jsonl", ".json", ".ndjson"),
    "csv": (".csv",),
    "text": (".txt", ".text"),
    "images": (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
}
OUTPUT_FORMATS = ("parquet", "jsonl")
PART_PREFIX = "part-"
READ_CPUS = 0.25  # read tasks share 2-core machines with the model actor, as the CPU stages do


def input_paths(spec: str) -> list[str]:
    """The files (or the remote URI) an `--input` names: a file, a folder, or a glob; missing ones fail here."""
    if "://" in spec:
        return [spec]
    if any(c in spec for c in "*?["):
        paths = sorted(glob.glob(spec, recursive=True))
        if not paths:
            raise SystemExit(f"--input {spec!r} matches no file")
        return [os.path.abspath(p) for p in paths]
    if not os.path.exists(spec):
        raise SystemExit(f"--input {spec!r} does not exist")
    return [os.path.abspath(spec)]


def input_format(paths: list[str], given: str | None) -> str:
    """The format asked for, else the one the file extensions say."""
    if given is not None:
        if given not in INPUT_FORMATS:
            raise SystemExit(f"unknown --input-format {given!r}; allowed: {sorted(INPUT_FORMATS)}")
        return given
    files = [p for p in paths if not os.path.isdir(p)] or [
        str(f) for p in paths for f in Path(p).rglob("*") if f.is_file()
    ]
    for name, extensions in INPUT_FORMATS.items():
        if files and all(f.endswith(extensions) for f in files):
            return name
    raise SystemExit(f"cannot tell the format of {paths[:3]}; pass --input-format, one of {sorted(INPUT_FORMATS)}")


def read(paths: list[str], fmt: str):
    """A streaming Ray Dataset over the input files."""
    import ray.data

    if fmt == "images":
        # Not ray.data.read_images: it decodes in the read task, where a corrupt file fails the job and EXIF
        # orientation is not applied. The bytes are decoded by the pipeline's own preprocess instead (the same
        # load_image as in process), so a bad file is that row's error.
        return ray.data.read_binary_files(paths, include_paths=True, num_cpus=READ_CPUS)
    readers = {
        "parquet": ray.data.read_parquet,
        "jsonl": ray.data.read_json,
        "csv": ray.data.read_csv,
        "text": ray.data.read_text,
    }
    extra = {"lines": True} if fmt == "jsonl" else {}
    return readers[fmt](paths, num_cpus=READ_CPUS, **extra)


# -- output -------------------------------------------------------------------------------------------------
def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local folder (made absolute) or a remote URI (s3://, gs://, ...)."""
    return pafs.FileSystem.from_uri(uri if "://" in uri else os.path.abspath(uri))


def part_files(uri: str) -> list[str]:
    fs, root = filesystem(uri)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    return sorted(i.path for i in infos if i.is_file and os.path.basename(i.path).startswith(PART_PREFIX))


def write_part(table: pa.Table, uri: str, fmt: str) -> str:
    """Write `table` as one new part file in `uri`, atomically (a temporary name, renamed when complete)."""
    fs, root = filesystem(uri)
    fs.create_dir(root, recursive=True)
    name = f"{PART_PREFIX}{uuid.uuid4().hex}.{fmt}"
    final = f"{root}/{name}"
    local = isinstance(fs, pafs.LocalFileSystem)
    target = f"{root}/.{name}.tmp" if local else final  # object stores write whole objects: already atomic
    with fs.open_output_stream(target) as out:
        if fmt == "parquet":
            pq.write_table(table, out)
        else:
            out.write(_jsonl(table))
    if local:
        fs.move(target, final)
    return final


def _jsonl(table: pa.Table) -> bytes:
    buffer = io.StringIO()
    for row in table.to_pylist():
        buffer.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    return buffer.getvalue().encode("utf-8")


def completed_ids(uris: list[str], id_column: str) -> pa.Array:
    """Ids of the rows in the complete part files of `uris` (results and errors): what a resume skips."""
    chunks = []
    for uri in uris:
        fs, _ = filesystem(uri)
        for path in part_files(uri):
            if path.endswith(".parquet"):
                chunks.append(pq.read_table(path, columns=[id_column], filesystem=fs).column(id_column))
            else:
                with fs.open_input_stream(path) as f:
                    ids = [json.loads(line)[id_column] for line in f.read().decode("utf-8").splitlines() if line]
                chunks.append(pa.chunked_array([pa.array(ids)]))
    if not chunks:
        return pa.array([])
    return pa.concat_arrays([c.combine_chunks() for c in chunks]).unique()


_DONE: dict = {}


def drop_done(table: pa.Table, id_column: str, done) -> pa.Table:
    """Rows of `table` whose id is not in `done` (an ObjectRef of the completed ids, fetched once per process)."""
    import ray

    key = done.hex() if isinstance(done, ray.ObjectRef) else id(done)
    if key not in _DONE:
        _DONE.clear()
        _DONE[key] = ray.get(done) if isinstance(done, ray.ObjectRef) else done
    ids = _DONE[key]
    if len(ids) == 0:
        return table
    column = table.column(id_column)
    if column.type != ids.type:
        ids = ids.cast(column.type)
    return table.filter(pc.invert(pc.is_in(column, value_set=ids)))
