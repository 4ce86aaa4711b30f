"""The processor seam: a modality added as a processor class plus a task file runs through every way in.

The byte-stats task (tests/processors/bytes_task.py) reads bytes; its answers are checked against the same
checkpoint's tensors computed by hand, in process, through the Ray stage functions over a binary Arrow column
(what Ray Data hands each stage), and after a pickle round trip of its processor (what a Ray CPU worker gets).
"""

import pickle

import pyarrow as pa
import pytest

from pipelines import pipeline
from pipelines.distributed import ModelStage, StageSpec, postprocess_batch, preprocess_batch
from pipelines.runtime import RuntimeConfig
from pipelines.tokenization import Tokenizer
from tests.checkpoints import write_tokenizer
from tests.processors import bytes_task

INPUTS = [b"\x89PNG\r\n\x1a\n", b"RIFF$\x00\x00\x00WAVEfmt ", bytes(range(256)), b"\xff", "a string, not bytes"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    bytes_task.register()
    return bytes_task.make_checkpoint(tmp_path_factory.mktemp("bytes"), max_length=64)


def _close(got: dict, want: dict):
    assert got["length"] == want["length"] and got["label"] == want["label"]
    assert got["score"] == pytest.approx(want["score"], abs=1e-5)


def test_a_new_modality_runs_in_process_against_hand_computed_answers(folder):
    """Byte inputs of different lengths batch together (padded, masked) and each answer equals the unbatched
    computation from the checkpoint's tensors; the 256-byte input is cut to the processor's 64."""
    pipe = pipeline("byte-stats", folder, batch_size=2)
    answers = pipe(INPUTS[:4])
    for data, got in zip(INPUTS[:4], answers):
        _close(got, bytes_task.reference(folder, data))
    assert answers[2]["length"] == 64
    assert pipe(INPUTS[0]) == answers[0]


def test_a_wrong_input_type_names_the_input_and_what_is_allowed(folder):
    """A string where bytes are expected fails with the processor's own message and the input's index."""
    pipe = pipeline("byte-stats", folder)
    with pytest.raises(TypeError, match=r"input #1: byte-stats reads bytes .*got str"):
        pipe([b"ok", "a string"])


def test_bytes_travel_through_the_ray_stages_in_a_binary_column(folder):
    """The three stage functions over a pa.binary() column give the in-process answers; the bad row is recorded
    with its reason and the others are kept."""
    spec = StageSpec(
        task="byte-stats",
        model=str(folder),
        column="data",
        output_column="stats",
        error_column="error",
        runtime=RuntimeConfig(device="cpu"),
    )
    table = pa.table({"data": pa.array(INPUTS[:4] + [b""], type=pa.binary())})
    out = postprocess_batch(ModelStage(spec)(preprocess_batch(table, spec)), spec).to_pylist()
    for data, row in zip(INPUTS[:4], out):
        _close(row["stats"], bytes_task.reference(folder, data))
        assert row["error"] is None
    assert out[4]["stats"] is None and "at least one byte" in out[4]["error"]


def test_processors_survive_pickling_for_cpu_workers(folder, tmp_path):
    """Ray ships processors to CPU workers by pickle: the copy encodes the same (the tokenizer's lock is rebuilt)."""
    processor = pickle.loads(pickle.dumps(pipeline("byte-stats", folder, load_weights=False).processor))
    assert processor.encode(b"\x00\x01") == {"byte_ids": [1, 2]}
    write_tokenizer(tmp_path, "bert")
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.encode("hello world").input_ids == tokenizer.encode("hello world").input_ids
    assert copy.encode("hello world", max_length=3).input_ids == tokenizer.encode("hello world", max_length=3).input_ids
    assert len(copy.encode("hello world", max_length=3)) == 3
