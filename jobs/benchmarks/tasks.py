"""Benchmark task pipelines on CPU: NER and long-context QA, ours against transformers.pipeline.

    python -m jobs.benchmarks.tasks [--threads 2] [--ner-texts 1000] [--qa-questions 200]
                                    [--qa-oracle-python /tmp/tf457/bin/python] [--only NAME,...] [--json OUT]
                                    [--dtype float32|bfloat16] [--repeats 3] [--repeat-budget 20]
                                    [--wait-idle 60] [--profile NAME]

Models: real-sized weights are offline only for all-MiniLM-L6-v2 (6 layers, hidden 384), so the parent
builds two checkpoints from it with transformers: BertForTokenClassification with the 9 CoNLL labels and
BertForQuestionAnswering, heads random (torch seed 0), saved as safetensors with MiniLM's tokenizer files.
The copied tokenizer.json has its stored `padding` (fixed, 128) and `truncation` (128) set to null: our
Tokenizer ignores both, and this way transformers cannot silently cut or pad its inputs to 128 either.

Inputs (written once to a JSON file that every configuration reads):
- NER: `make_corpus(ner_texts, seed=2)`, 5..200 words; aggregation_strategy="simple".
- QA: 20 contexts of 600..1500 words (make_corpus pieces joined, seed 3) with questions spread evenly
  over them (questions // 20 each), each question a 2..5 word phrase taken from its context; default
  doc_stride 128 and max_seq_len 384, so every input needs several windows.

Every configuration (the CONFIGS table) runs in its own subprocess: import, build the pipeline (load s),
warm up on a few inputs, then timed runs over all inputs at `torch.set_num_threads(threads)`: the best of
`--repeats`, or of fewer where another run would take the timed total past `--repeat-budget` seconds (so
the long QA runs run once). The parent waits (up to --wait-idle seconds) for an idle machine before each
one and runs a disturbed one again once.
- Ours: the pipeline's micro-batch defaults (fp32; bf16 as an extra row) and, for NER, batch_size=32
  without a token budget.
- transformers: batch sizes 1, 8, 32 for NER; 1 and 8 for QA (its windows are all ~384 tokens, so b32
  only adds memory; name qa-hf-b32 in --only to run it too). NER's is `transformers.pipeline` of this
  venv (transformers 5); QA's is transformers 4.57's `pipeline("question-answering")` (transformers 5 has
  none), run by this same module under `--qa-oracle-python`, a venv with transformers 4.57 and torch (this
  file and jobs/benchmarks/harness.py import only the standard library at the top so that they run there).

Columns: tokens are real tokens (special tokens included, no padding) of every forward pass, counted
with our tokenizer (QA: of every window); padded: tokens the model actually ran (input_ids.numel() summed by
a forward pre-hook) over real tokens; other CPU: CPU used by other processes during the timed run, as a
share of all cores (above a few percent the timing was disturbed); peak RSS: ru_maxrss of the child;
x best HF: the best transformers batch size's run time over this row's; agreement with that same
transformers run, as "spans ; +scores": NER, texts whose entity lists are identical in groups, words and
offsets; then also in scores within 1e-4. QA, questions with the same answer text, start and end; then also
a score within 1e-4 relative (QA scores are products of two probabilities, often ~1e-5).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.benchmarks.harness import (
    TokenCounter,
    add_timing_arguments,
    argument_parser,
    best_of,
    command_line,
    markdown_table,
    maxrss_mb,
    minilm_folder,
    module_command,
    provenance,
    run_isolated,
    save_json,
    select_configs,
    spawn,
    top_ops,
)

MODULE = "jobs.benchmarks.tasks"
NER_SEED, QA_SEED, HEAD_SEED = 2, 3, 0
QA_CONTEXTS, QA_WORDS = 20, (600, 1500)
WARMUP = {"ner": 16, "qa": 4}
SCORE_ATOL = 1e-4
CONLL = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
HF_BATCH_SIZES = (1, 8, 32)
NO_BUDGET = 10**9  # max_batch_tokens that never binds: batch_size alone cuts the micro-batches

# name -> what the child builds. kind: ours | hf (transformers.pipeline; QA under the 4.57 interpreter)
CONFIGS: dict[str, dict] = {
    "ner-ours-fp32": dict(task="ner", kind="ours", dtype="float32"),  # the pipeline's micro-batch defaults
    "ner-ours-fp32-b32": dict(task="ner", kind="ours", dtype="float32", batch_size=32, max_batch_tokens=NO_BUDGET),
    "ner-ours-bf16": dict(task="ner", kind="ours", dtype="bfloat16"),
    **{f"ner-hf-b{b}": dict(task="ner", kind="hf", dtype="float32", batch_size=b) for b in HF_BATCH_SIZES},
    "qa-ours-fp32": dict(task="qa", kind="ours", dtype="float32"),
    "qa-ours-bf16": dict(task="qa", kind="ours", dtype="bfloat16"),
    **{f"qa-hf-b{b}": dict(task="qa", kind="hf", dtype="float32", batch_size=b) for b in HF_BATCH_SIZES},
}
OPTIONAL = ("qa-hf-b32",)  # run only when named in --only
TASK_NAMES = {"ner": "token-classification", "qa": "question-answering"}


# -- inputs and checkpoints (parent) ---------------------------------------------------------------------
def ner_inputs(n: int) -> list[str]:
    from jobs.benchmarks.corpus import make_corpus

    return make_corpus(n, seed=NER_SEED)


def qa_inputs(n_questions: int) -> list[dict]:
    """Questions spread evenly over QA_CONTEXTS long contexts; each a short phrase of its context."""
    from jobs.benchmarks.corpus import make_corpus

    rng = random.Random(QA_SEED)
    pieces = iter(make_corpus(QA_CONTEXTS * 40, seed=QA_SEED, min_words=60, max_words=200))
    contexts = []
    for _ in range(QA_CONTEXTS):
        target, words = rng.randint(*QA_WORDS), []
        while len(words) < target:
            words.extend(next(pieces).split())
        contexts.append(" ".join(words[:target]))
    items = []
    for i in range(n_questions):
        context = contexts[i % QA_CONTEXTS]
        words = context.split()
        length = rng.randint(2, 5)
        start = rng.randrange(len(words) - length)
        items.append({"question": " ".join(words[start : start + length]).strip(".!?") + "?", "context": context})
    return items


def build_checkpoints(minilm: Path, out: Path) -> dict[str, Path]:
    """NER and QA checkpoints from MiniLM's encoder, heads random (seed HEAD_SEED); see the module docstring."""
    import torch
    import transformers
    from transformers import AutoModelForQuestionAnswering, AutoModelForTokenClassification

    transformers.logging.set_verbosity_error()  # the expected load report: pooler unused, heads new
    transformers.logging.disable_progress_bar()
    folders = {"ner": out / "minilm-ner", "qa": out / "minilm-qa"}
    id2label = dict(enumerate(CONLL))
    builders = {
        "ner": lambda: AutoModelForTokenClassification.from_pretrained(
            minilm, num_labels=len(CONLL), id2label=id2label, label2id={v: k for k, v in id2label.items()}
        ),
        "qa": lambda: AutoModelForQuestionAnswering.from_pretrained(minilm),
    }
    for task, folder in folders.items():
        torch.manual_seed(HEAD_SEED)
        builders[task]().save_pretrained(folder, safe_serialization=True)
        for name in TOKENIZER_FILES:
            (folder / name).write_bytes((minilm / name).read_bytes())
        tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        tokenizer["padding"] = tokenizer["truncation"] = None
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    return folders


def count_tokens(task: str, folder: Path, inputs: list) -> list[list[int]]:
    """Real tokens of each forward pass our preprocess makes, per input (QA: one per window)."""
    from pipelines import pipeline

    pipe = pipeline(TASK_NAMES[task], model=folder, load_weights=False)
    return [[len(p["input_ids"]) for p in pipe.preprocess_item(x, i)] for i, x in enumerate(inputs)]


def check_oracle(python: str, folder: Path) -> str:
    """transformers' version under `python`, after checking that it loads the QA checkpoint."""
    code = (
        "import sys, transformers; transformers.AutoModelForQuestionAnswering.from_pretrained(sys.argv[1]); "
        "print(transformers.__version__)"
    )
    done = subprocess.run([python, "-c", code, str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{python} cannot load the QA checkpoint with transformers:\n{done.stderr[-2000:]}")
    return done.stdout.strip()


# -- child side ----------------------------------------------------------------------------------------------
def build_ours(spec: dict, folder: str):
    from pipelines import pipeline

    params = {"aggregation_strategy": "simple"} if spec["task"] == "ner" else {}
    pipe = pipeline(
        TASK_NAMES[spec["task"]],
        model=folder,
        dtype=spec["dtype"],
        batch_size=spec.get("batch_size"),
        max_batch_tokens=spec.get("max_batch_tokens"),
        **params,
    )
    spec.setdefault("batch_size", pipe.batch_size)  # the defaults, for the table
    spec.setdefault("max_batch_tokens", pipe.max_batch_tokens)
    return pipe, lambda inputs: pipe(inputs)


def build_hf(spec: dict, folder: str):
    """transformers.pipeline on the same folder, fp32; NER with aggregation_strategy="simple", QA with defaults."""
    import transformers

    if spec["task"] == "ner":
        pipe = transformers.pipeline("token-classification", model=folder, aggregation_strategy="simple", device="cpu")
        return pipe, lambda texts: pipe(texts, batch_size=spec["batch_size"])
    pipe = transformers.pipeline("question-answering", model=folder, device="cpu")

    def run(items):
        questions, contexts = [x["question"] for x in items], [x["context"] for x in items]
        return pipe(question=questions, context=contexts, batch_size=spec["batch_size"])

    return pipe, run


def plain(task: str, outputs: list | dict) -> list:
    """JSON-able outputs, one per input: numpy scalars (transformers) to Python numbers."""
    if task == "ner":
        return [
            [
                {
                    "entity_group": e["entity_group"],
                    "score": float(e["score"]),
                    "word": e["word"],
                    "start": int(e["start"]),
                    "end": int(e["end"]),
                }
                for e in entities
            ]
            for entities in outputs
        ]
    outputs = [outputs] if isinstance(outputs, dict) else outputs  # both answer a one-question list with a dict
    return [
        {"answer": a["answer"], "score": float(a["score"]), "start": int(a["start"]), "end": int(a["end"])}
        for a in outputs
    ]


def run_child(name: str, threads: int, workdir: Path, repeats: int = 1, repeat_budget_s: float = 0.0) -> None:
    """One configuration: build (timed), warm up, then the best of up to `repeats` timed runs over all inputs,
    fewer where another run would take the timed total past `repeat_budget_s`; writes NAME.json."""
    import torch

    torch.set_num_threads(threads)
    spec = CONFIGS[name]
    setup = json.loads((workdir / "setup.json").read_text(encoding="utf-8"))
    inputs = setup["inputs"][spec["task"]]
    baseline = maxrss_mb()
    start = time.perf_counter()
    pipe, run = (build_ours if spec["kind"] == "ours" else build_hf)(spec, setup["folders"][spec["task"]])
    load_s = time.perf_counter() - start
    run(inputs[: WARMUP[spec["task"]]])
    counter = TokenCounter(pipe.model)
    timings = best_of(lambda: run(inputs), repeats, repeat_budget_s, before_each=lambda: setattr(counter, "tokens", 0))
    result = {
        "name": name,
        **spec,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        **timings.fields(),
        "tokens_run": counter.tokens,
        "peak_rss_mb": maxrss_mb(),
        "baseline_rss_mb": baseline,
        "outputs": plain(spec["task"], timings.result),
        "library": "ours" if spec["kind"] == "ours" else f"transformers {_transformers_version()}",
    }
    (workdir / f"{name}.json").write_text(json.dumps(result), encoding="utf-8")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def run_profile(name: str, threads: int, workdir: Path) -> None:
    """cProfile (top functions by cumulative time) and torch.profiler (top ops) over one timed run of `name`."""
    import cProfile
    import pstats

    import torch

    torch.set_num_threads(threads)
    spec = CONFIGS[name]
    setup = json.loads((workdir / "setup.json").read_text(encoding="utf-8"))
    inputs = setup["inputs"][spec["task"]]
    _, run = (build_ours if spec["kind"] == "ours" else build_hf)(spec, setup["folders"][spec["task"]])
    run(inputs[: WARMUP[spec["task"]]])
    profiler = cProfile.Profile()
    profiler.runcall(run, inputs)
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
    print(top_ops(lambda: run(inputs)))


# -- parent side -------------------------------------------------------------------------------------------------
def select(only: str | None, dtype: str | None) -> list[str]:
    """Config names from --only (exact names or prefixes: 'qa', 'ner-hf'), our rows kept to --dtype if given."""
    names = select_configs(only, list(CONFIGS), optional=OPTIONAL, hint=" (or a prefix: ner, qa-hf)")
    return [n for n in names if dtype is None or CONFIGS[n]["kind"] == "hf" or CONFIGS[n]["dtype"] == dtype]


def child_command(name: str, workdir: Path, args) -> list[str]:
    """The command that runs `name` in a subprocess: QA's transformers under the 4.57 interpreter."""
    spec = CONFIGS[name]
    python = args.qa_oracle_python if spec["task"] == "qa" and spec["kind"] == "hf" else sys.executable
    options = ["--workdir", workdir, "--threads", args.threads, "--repeats", args.repeats]
    options += ["--repeat-budget", args.repeat_budget]
    return module_command(MODULE, "--child", name, *options, python=python)


def profile_config(name: str, workdir: Path, args) -> None:
    spawn([*child_command(name, workdir, args), "--profile", name])


def run_config(name: str, workdir: Path, args) -> dict:
    """One configuration in its own subprocess, after waiting for an idle machine; run again once if disturbed."""
    return run_isolated(name, child_command(name, workdir, args), workdir / f"{name}.json", args.wait_idle)


def same_ner(ours: list[dict], ref: list[dict], check_scores: bool = True) -> bool:
    keys = ("entity_group", "word", "start", "end")
    return len(ours) == len(ref) and all(
        all(a[k] == b[k] for k in keys) and (not check_scores or abs(a["score"] - b["score"]) <= SCORE_ATOL)
        for a, b in zip(ours, ref)
    )


def same_qa(ours: dict, ref: dict, check_scores: bool = True) -> bool:
    """Same answer text, start and end; scores (products of two probabilities, often ~1e-5) within 1e-4 relative."""
    same_span = all(ours[k] == ref[k] for k in ("answer", "start", "end"))
    return same_span and (not check_scores or abs(ours["score"] - ref["score"]) <= SCORE_ATOL * abs(ref["score"]))


def add_agreement(results: list[dict]) -> None:
    """Per row, against the best transformers run of its task: `agree` (scores within 1e-4) and `agree_spans`."""
    for task, same in (("ner", same_ner), ("qa", same_qa)):
        rows = [r for r in results if r["task"] == task]
        ref = best_hf(rows)
        for r in rows:
            if ref is None:
                r["agree"] = r["agree_spans"] = None
                continue
            pairs = list(zip(r["outputs"], ref["outputs"]))
            r["agree"] = sum(same(a, b) for a, b in pairs) / len(pairs)
            r["agree_spans"] = sum(same(a, b, check_scores=False) for a, b in pairs) / len(pairs)


def best_hf(rows: list[dict]) -> dict | None:
    hf = [r for r in rows if r["kind"] == "hf"]
    return min(hf, key=lambda r: r["run_s"]) if hf else None


def table(results: list[dict], tokens: dict[str, int]) -> list[str]:
    header = (
        "task|name|dtype|batch|load s|run s (n)|inputs/s|tokens/s|padded|other CPU|peak RSS MB|x best HF"
        "|agreement (spans; +scores 1e-4)"
    ).split("|")
    lines = []
    for task in ("ner", "qa"):
        rows = [r for r in results if r["task"] == task]
        best = best_hf(rows)
        for r in rows:
            if r["kind"] == "hf" and r is not best:
                continue
            budget = r.get("max_batch_tokens")
            batch = str(r["batch_size"]) + (f", <= {budget} tok" if budget and budget != NO_BUDGET else "")
            label = "ours" if r["kind"] == "ours" else f"{r['library']} pipeline"
            speedup = f"{best['run_s'] / r['run_s']:.2f}x" if best else "n/a"
            agree = "n/a" if r["agree"] is None else f"{100 * r['agree_spans']:.1f}% ; {100 * r['agree']:.1f}%"
            agree = "(reference)" if r is best else agree
            lines.append(
                [
                    TASK_NAMES[task],
                    label,
                    r["dtype"],
                    batch,
                    f"{r['load_s']:.2f}",
                    f"{r['run_s']:.2f} ({len(r['runs_s'])})",
                    f"{len(r['outputs']) / r['run_s']:.1f}",
                    f"{tokens[task] / r['run_s']:.0f}",
                    f"{r['tokens_run'] / tokens[task]:.2f}x",
                    f"{100 * r['other_cpu']:.0f}%",
                    f"{r['peak_rss_mb']:.0f}",
                    speedup,
                    agree,
                ]
            )
    return markdown_table(header, lines)


def report(args, lengths: dict[str, list[list[int]]], results: list[dict], elapsed: float, oracle: str) -> None:
    tokens = {task: sum(map(sum, per_input)) for task, per_input in lengths.items()}
    if "ner" in lengths:
        ner = [n for passes in lengths["ner"] for n in passes]
        print(
            f"NER: {len(ner)} texts, {tokens['ner']} real tokens (mean {tokens['ner'] / len(ner):.1f}, max {max(ner)})"
        )
    if "qa" in lengths:
        windows = sum(map(len, lengths["qa"]))
        print(
            f"QA: {len(lengths['qa'])} questions over {QA_CONTEXTS} contexts of {QA_WORDS[0]}..{QA_WORDS[1]} words, "
            f"{windows} windows ({windows / len(lengths['qa']):.1f} per question) of {tokens['qa']} real tokens; "
            f"reference: transformers {oracle} under {args.qa_oracle_python}"
        )
    now = provenance()
    changed = "" if now == args.provenance else f" (at the start: {args.provenance}; pipelines/ changed during the run)"
    print(
        f"{args.threads} threads; after a warm-up, the best of up to {args.repeats} timed runs within "
        f"{args.repeat_budget:.0f} s per configuration; {now}{changed}\n"
    )
    print("\n".join(table(results, tokens)))
    for task in ("ner", "qa"):
        hf = [r for r in results if r["task"] == task and r["kind"] == "hf"]
        if hf:
            runs = ", ".join(f"b{r['batch_size']} {r['run_s']:.2f} s ({r['peak_rss_mb']:.0f} MB)" for r in hf)
            print(f"\n{TASK_NAMES[task]}, transformers at every batch size: {runs}")
    print()
    for r in results:
        best = best_hf([x for x in results if x["task"] == r["task"]])
        if r["kind"] == "ours" and best:
            speedup = best["run_s"] / r["run_s"]
            print(
                f"- {r['name']} vs transformers b{best['batch_size']}: {speedup:.2f}x "
                f"(target >= 3x{'' if r['dtype'] == 'float32' else ', fp32 only'}): "
                f"{'met' if speedup >= 3 else 'MISSED'}"
            )
    print(f"\nbenchmark wall time {elapsed:.0f} s")


def main(argv: list[str] | None = None) -> dict | None:
    parser = argument_parser(MODULE, __doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ner-texts", type=int, default=1000)
    parser.add_argument("--qa-questions", type=int, default=200)
    parser.add_argument(
        "--qa-oracle-python",
        default="/tmp/tf457/bin/python",
        help="a Python with transformers 4.57 and torch, for the QA reference",
    )
    add_timing_arguments(parser, wait_idle_s=60.0, repeats=3, repeat_budget_s=20.0)
    parser.add_argument("--only", help=f"comma-separated configurations or prefixes; known: {', '.join(CONFIGS)}")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="only our rows of this dtype")
    parser.add_argument("--json", type=Path, help="also write the measurements (without outputs) here")
    parser.add_argument("--profile", metavar="NAME", help="instead: profile one configuration (cProfile + torch)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.profile:
            return run_profile(args.child, args.threads, args.workdir)
        return run_child(args.child, args.threads, args.workdir, args.repeats, args.repeat_budget)

    names = [args.profile] if args.profile else select(args.only, args.dtype)
    if args.profile and args.profile not in CONFIGS:
        raise SystemExit(f"unknown configuration {args.profile!r}; known: {', '.join(CONFIGS)}")
    tasks = sorted({CONFIGS[n]["task"] for n in names})
    args.provenance = provenance()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp:
        workdir = Path(tmp)
        folders = build_checkpoints(minilm_folder(), workdir)
        inputs = {
            "ner": ner_inputs(args.ner_texts) if "ner" in tasks else [],
            "qa": qa_inputs(args.qa_questions) if "qa" in tasks else [],
        }
        setup = {"folders": {k: str(v) for k, v in folders.items()}, "inputs": inputs}
        (workdir / "setup.json").write_text(json.dumps(setup), encoding="utf-8")
        if args.profile:
            return profile_config(args.profile, workdir, args)
        oracle = check_oracle(args.qa_oracle_python, folders["qa"]) if "qa" in tasks else "n/a"
        lengths = {task: count_tokens(task, folders[task], inputs[task]) for task in tasks}
        results = [run_config(n, workdir, args) for n in names]
    add_agreement(results)
    elapsed = time.perf_counter() - started
    report(args, lengths, results, elapsed, oracle)
    tokens = {k: sum(map(sum, v)) for k, v in lengths.items()}
    summary = {
        "command": command_line(MODULE, argv),
        "provenance": args.provenance,
        "threads": args.threads,
        "tokens": tokens,
        "elapsed_s": elapsed,
        "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results],
    }
    return save_json(args.json, summary)


if __name__ == "__main__":
    main()
