"""Write tests/data/qa_reference/<family>/: a tiny question-answering checkpoint and reference.json, the outputs of
transformers 4.57's `pipeline("question-answering")` on it (transformers 5 removed that pipeline, so the
reference is computed once, here, and committed).

Run from the repository root with transformers 4.57 in a separate environment:

    python3 -m venv /tmp/tf457 && /tmp/tf457/bin/pip install torch==2.13.0 "transformers==4.57.*"
    /tmp/tf457/bin/python tests/data/make_qa_reference.py            # reuses the committed checkpoints
    /tmp/tf457/bin/python tests/data/make_qa_reference.py --rebuild  # remakes them with tests/checkpoints.py

Each case records the call (positional inputs or question=/context= keywords), its parameters, the output,
the number of chunks transformers made per input, and `zero_score_filler`: whether transformers' span shortlist
took score-0 spans in some chunk (see QuestionAnsweringPipeline's docstring; such entries are not reproduced).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402 - after the sys.path entry above
import transformers  # noqa: E402 - after the sys.path entry above
import transformers.pipelines.question_answering as hf_qa  # noqa: E402 - after the sys.path entry above

from tests.checkpoints import _CORPUS, SENTENCES, make_checkpoint  # noqa: E402 - after the sys.path entry above

OUT = ROOT / "tests" / "data" / "qa_reference"
FAMILIES = ("bert", "roberta")  # WordPiece and byte-level BPE
CHECKPOINT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)

SHORT = [
    {"question": "What is the capital of France?", "context": "Paris is the capital and the largest city of France."},
    {"question": "Where does John live?", "context": "My name is John and I live in New York."},
    {"question": "How is the weather?", "context": "The weather today is sunny, but tomorrow it may rain."},
    {"question": "What splits words?", "context": "Tokenization splits unbelievably long words into several pieces."},
    {"question": "Where is the café?", "context": "A café in Zürich serves great coffee, doesn't it?"},
]
LONG_CONTEXT = " ".join(SENTENCES[1:7] + _CORPUS + SENTENCES[1:5])  # ~250 (WordPiece) to ~390 (BPE) tokens
LONG = [
    {"question": "Where does John live?", "context": LONG_CONTEXT},
    {"question": "What is the capital of France?", "context": LONG_CONTEXT[300:]},
]
MIXED = [SHORT[0], LONG[0], SHORT[3]]

# (name, inputs, parameters); inputs given positionally unless they are {"keywords": {...}}
CASES = [
    ("short", SHORT, {}),
    ("short_top_k_3", SHORT, {"top_k": 3}),
    ("short_impossible", SHORT, {"handle_impossible_answer": True}),
    ("short_impossible_top_k_4", SHORT, {"handle_impossible_answer": True, "top_k": 4}),
    ("short_unaligned", SHORT, {"align_to_words": False}),
    ("short_unaligned_top_k_3", SHORT, {"align_to_words": False, "top_k": 3}),
    ("short_max_answer_len_1", SHORT, {"max_answer_len": 1, "top_k": 2}),
    ("short_max_answer_len_2_unaligned", SHORT, {"max_answer_len": 2, "top_k": 3, "align_to_words": False}),
    ("short_max_question_len_is_ignored", SHORT, {"max_question_len": 2}),
    ("long", LONG, {}),
    ("long_top_k_3", LONG, {"top_k": 3}),
    ("long_small_windows", LONG, {"max_seq_len": 40, "doc_stride": 12, "top_k": 3}),
    ("long_unaligned", LONG, {"max_seq_len": 48, "doc_stride": 8, "align_to_words": False, "top_k": 2}),
    ("long_impossible", LONG, {"max_seq_len": 48, "doc_stride": 20, "handle_impossible_answer": True, "top_k": 3}),
    ("long_max_answer_len_3", LONG, {"max_seq_len": 32, "doc_stride": 10, "max_answer_len": 3, "top_k": 5}),
    ("long_zero_stride", LONG, {"max_seq_len": 36, "doc_stride": 0}),
    ("mixed", MIXED, {"top_k": 2}),
    ("one_dict", SHORT[1], {}),
    ("one_item_list", [SHORT[1]], {"top_k": 3}),
    ("keywords", {"keywords": {"question": SHORT[0]["question"], "context": SHORT[0]["context"]}}, {}),
    (
        "keywords_questions_one_context",
        {"keywords": {"question": ["Who lives in New York?", "What is my name?"], "context": SHORT[1]["context"]}},
        {},
    ),
    (
        "keywords_lists",
        {"keywords": {"question": [d["question"] for d in SHORT[:3]], "context": [d["context"] for d in SHORT[:3]]}},
        {"top_k": 2},
    ),
    ("few_spans_top_k_5", {"question": "What?", "context": "Paris."}, {"top_k": 5}),
]


class Recorder:
    """Counts transformers' chunks per input and notices score-0 spans in its shortlist, until `restore()`."""

    def __init__(self, pipe):
        self.chunks, self.filler = [], False
        self.pipe, self.originals = pipe, (pipe.preprocess, hf_qa.decode_spans)
        preprocess, decode = self.originals

        def counting(*args, **kwargs):
            for n, features in enumerate(preprocess(*args, **kwargs), 1):
                if features["is_last"]:  # transformers may stop iterating right after the last chunk
                    self.chunks.append(n)
                yield features

        def recording(*args, **kwargs):
            starts, ends, scores = decode(*args, **kwargs)
            self.filler |= bool((scores == 0).any())
            return starts, ends, scores

        pipe.preprocess, hf_qa.decode_spans = counting, recording

    def restore(self) -> None:
        self.pipe.preprocess, hf_qa.decode_spans = self.originals


def run_case(pipe, inputs, params) -> dict:
    recorder = Recorder(pipe)
    try:
        if isinstance(inputs, dict) and "keywords" in inputs:
            output = pipe(**inputs["keywords"], **params)
            call = {"keywords": inputs["keywords"]}
        else:
            output = pipe(inputs, **params)
            call = {"inputs": inputs}
    finally:
        recorder.restore()
    return {**call, "params": params, "output": output, "chunks": recorder.chunks, "zero_score_filler": recorder.filler}


def make_family(family: str, rebuild: bool) -> None:
    folder = OUT / family
    if rebuild or not all((folder / name).is_file() for name in CHECKPOINT_FILES):
        make_checkpoint(folder, family, "question-answering")
    pipe = transformers.pipeline("question-answering", model=str(folder), device="cpu")
    cases = [{"name": name, **run_case(pipe, inputs, params)} for name, inputs, params in CASES]
    reference = {"transformers": transformers.__version__, "torch": torch.__version__, "family": family, "cases": cases}
    (folder / "reference.json").write_text(json.dumps(reference, indent=1, ensure_ascii=False) + "\n")
    fillers = [c["name"] for c in cases if c["zero_score_filler"]]
    print(
        f"{family}: {len(cases)} cases into {folder}; chunks per input {[c['chunks'] for c in cases]}; "
        f"score-0 filler in {fillers}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rebuild", action="store_true", help="remake the checkpoints instead of reusing them")
    args = parser.parse_args()
    if not transformers.__version__.startswith("4.57."):
        sys.exit(f"needs transformers 4.57 (the last with this pipeline), not {transformers.__version__}")
    for family in FAMILIES:
        make_family(family, args.rebuild)


if __name__ == "__main__":
    main()
