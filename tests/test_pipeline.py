"""The pipeline() factory and the Pipeline contract: tasks, inputs, streaming, batching, errors."""

import pytest
import torch

from pipelines import ChunkPipeline, Pipeline, pipeline, register_pipeline
from pipelines.batching import ItemOutOfMemoryError
from pipelines.registry import TASKS
from pipelines.tokenization import Tokenizer
from tests.checkpoints import SENTENCES, load_ours
from tests.compare import assert_same_output
from tests.faults import simulate_oom

TEXTS = SENTENCES * 5  # 40 texts of mixed length


@pytest.fixture(scope="module")
def classifier_path(checkpoint):
    return checkpoint("bert", "sequence-classification")


@pytest.fixture(scope="module")
def clf(classifier_path):
    return pipeline("text-classification", model=classifier_path, top_k=None)


def test_task_inferred_from_config(checkpoint, classifier_path):
    """With only a model, config.json's architecture picks the task."""
    assert pipeline(model=classifier_path).task == "text-classification"
    assert pipeline(model=checkpoint("distilbert", "base")).task == "feature-extraction"


def test_unknown_task_suggests_the_nearest():
    """An unknown task names the nearest known one; no task and no model says what to pass."""
    with pytest.raises(ValueError, match="unknown task 'sentimnet-analysis'; did you mean 'sentiment-analysis'"):
        pipeline("sentimnet-analysis")
    with pytest.raises(ValueError, match="pass a task, a model, or both"):
        pipeline()


def test_batched_equals_one_at_a_time_in_input_order(clf):
    """Length-sorted micro-batching never changes a result nor the order of results."""
    batched = clf(TEXTS, batch_size=7, max_batch_tokens=100)
    single = [clf([t], batch_size=1)[0] for t in TEXTS]
    assert_same_output(batched, single, atol=1e-5)


def test_generator_input_streams(clf):
    """A generator gives an iterator that pulls inputs window by window, not the whole input first."""
    pulled = []

    def texts():
        for i in range(1000):
            pulled.append(i)
            yield SENTENCES[i % len(SENTENCES)]

    results = clf(texts(), batch_size=4)
    assert not isinstance(results, list)
    first = next(results)
    assert len(first) == 3
    assert len(pulled) == clf.window_batches * 4  # one window, not 1000
    rest = list(results)
    assert len(rest) == 999


def test_injected_out_of_memory_is_recovered(clf):
    """With the model failing above 60 tokens per call, micro-batches split and results are unchanged."""
    expected = clf(TEXTS, batch_size=16)
    handle = simulate_oom(clf.model, max_tokens=60)
    try:
        assert_same_output(clf(TEXTS, batch_size=16), expected, atol=1e-5)
        long = "one two three four five six seven eight nine ten " * 10  # ~100 tokens alone
        with pytest.raises(ItemOutOfMemoryError, match="item 2 "):
            clf(["short", "short too", long])
    finally:
        handle.remove()


def test_edge_inputs(clf):
    """Empty list -> []; empty string is classified (as [CLS] [SEP]); a tuple acts like a list."""
    assert clf([]) == []
    assert len(clf("", top_k=1)) == 1
    assert clf(("a", "b")) == clf(["a", "b"])
    long = " ".join(["word"] * 5000)
    assert clf(long, top_k=1)[0]["label"].startswith("LABEL_")  # truncated, never a crash


def test_bad_items_name_their_index(clf):
    """A non-string input fails naming its index and its type."""
    for bad, kind in [(None, "NoneType"), (3.5, "float"), (b"bytes", "bytes")]:
        with pytest.raises(TypeError, match=f"input #1: expected a string, got {kind}"):
            clf(["fine", bad])


def test_invalid_batch_sizes(clf):
    """A zero batch_size or negative max_batch_tokens is refused naming the parameter."""
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        clf(["a"], batch_size=0)
    with pytest.raises(ValueError, match="max_batch_tokens must be >= 1"):
        clf(["a"], max_batch_tokens=-5)


def test_progress_bar(clf, capsys):
    """progress=True shows a progress bar on stderr."""
    clf(TEXTS, progress=True)
    assert "text-classification" in capsys.readouterr().err


def test_tokenizer_only_pipeline(classifier_path):
    """load_weights=False: preprocess and postprocess work without weights (for CPU stages)."""
    cpu_stage = pipeline("text-classification", model=classifier_path, load_weights=False)
    assert cpu_stage.model is None
    features = cpu_stage.preprocess_item("hello world", 0)
    assert features[0]["input_ids"][0] == cpu_stage.tokenizer.token_id("cls_token")
    answer = cpu_stage.postprocess_item([{"logits": torch.tensor([0.0, 2.0, 0.0])}])
    assert answer["label"] == "LABEL_1"
    with pytest.raises(RuntimeError, match="built without weights"):
        cpu_stage("hello")


def test_module_object_with_tokenizer(classifier_path, clf):
    """model= an nn.Module plus tokenizer= (and config=) works like the folder."""
    from pipelines.models.bert import BertForSequenceClassification

    module = load_ours(classifier_path, BertForSequenceClassification)
    pipe = pipeline(
        "text-classification",
        model=module,
        tokenizer=Tokenizer.from_pretrained(classifier_path),
        config=clf.config,
        top_k=None,
    )
    assert_same_output(pipe(SENTENCES), clf(SENTENCES), atol=1e-5)
    with pytest.raises(ValueError, match="needs tokenizer="):
        pipeline("text-classification", model=module)


def test_register_custom_task_and_override_class(classifier_path):
    """register_pipeline adds a task (with aliases); pipeline_class= replaces a built-in class."""

    class PairScore(Pipeline):
        task = "pair-score"

        def preprocess(self, item):
            return self.encode_text(item["a"], item["b"]).model_inputs()

        def _forward(self, inputs):
            return {"logits": self.model(**inputs)}

        def postprocess(self, outputs):
            return round(outputs["logits"].softmax(-1)[0].item(), 6)

    register_pipeline("pair-score", PairScore, "sequence-classification", aliases=("pairs",))
    try:
        pipe = pipeline("pairs", model=classifier_path)
        assert isinstance(pipe, PairScore)
        scores = pipe([{"a": "x", "b": "y"}, {"a": "hello", "b": "world"}])
        assert all(0 < s < 1 for s in scores)
    finally:
        del TASKS["pair-score"]

    class Upper(TASKS["text-classification"].pipeline_class):
        def postprocess(self, outputs, **params):
            result = super().postprocess(outputs, **params)
            return {**result, "label": result["label"].upper()}

    pipe = pipeline("text-classification", model=classifier_path, pipeline_class=Upper)
    assert pipe(["x"])[0]["label"].startswith("LABEL_")
    with pytest.raises(ValueError, match="unknown head"):
        register_pipeline("x", PairScore, "classification")


def test_chunk_pipeline_regroups_chunks_across_inputs(classifier_path):
    """A ChunkPipeline's chunks of several inputs are batched together and regrouped per input, in order."""

    class Windows(ChunkPipeline):
        task = "windows"

        def preprocess(self, item):
            for encoding in self.encode_text(item, max_length=8, stride=2, return_overflowing=True):
                yield {**encoding.model_inputs(), "length": len(encoding)}

        def _forward(self, inputs):
            return {"logits": self.model(**inputs)}

        def postprocess(self, chunks):
            return [(c["length"], c["logits"].argmax().item()) for c in chunks]

    pipe = pipeline("text-classification", model=classifier_path, pipeline_class=Windows)
    texts = ["short", "a much longer text that needs several windows of eight tokens each", "mid sized text here"]
    results = pipe(texts, batch_size=3)
    windows = [len(pipe.encode_text(t, max_length=8, stride=2, return_overflowing=True)) for t in texts]
    assert windows[0] == 1 and windows[1] > 2
    assert [len(r) for r in results] == windows
    alone = [pipe([t], batch_size=1)[0] for t in texts]
    assert results == alone
