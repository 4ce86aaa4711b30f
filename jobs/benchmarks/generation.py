"""Benchmark text generation: our continuous-batching engine against transformers.pipeline("text-generation").

    python -m jobs.benchmarks.generation [--prompts 64] [--threads 2] [--device cpu] [--dtype float32]
                                         [--hf-batch-sizes 1,8,16,32] [--time-budget 150] [--only ours,hf-b8]
                                         [--ours-batch-size 64] [--ours-max-batch-tokens N] [--workdir DIR]
                                         [--wait-idle 60] [--json OUT] [--profile]

Model: a GPT-2-small shaped random GPT2LMHeadModel (n_embd 768, 12 layers, 12 heads, n_positions 1024, vocab
50257; transformers' own init, torch seed 0), saved with `save_pretrained` (safetensors) and built once into
`--workdir` (default: <tmp>/benchmark_generation; rebuilt only when CHECKPOINT changes). Its tokenizer is a
GPT-2-style byte-level BPE trained with `tokenizers` on `make_corpus` text (the 256 bytes and ~550 merges: the
corpus' small vocabulary stops the trainer well below TOKENIZER_TRAINED), then filled with byte-level letter
strings ("Ġabc", "abc", ...) up to id 50255, so that every id decodes to text (the fillers have no merges:
encoding never yields them), and "<|endoftext|>" = 50256 (bos, eos, unk), as in GPT-2.

Workload (seed SEED): `--prompts` prompts of 10..300 tokens (uniform; make_corpus text cut at that many
tokens), each with its own max_new_tokens drawn from NEW_TOKENS. Every request is greedy (do_sample=False) with
min_new_tokens = max_new_tokens, so each produces exactly max_new_tokens tokens on both sides (checked on the
outputs) and tokens/s compare the same work: generated tokens = the sum of max_new_tokens.
Outputs are token ids (return_tensors=True) on both sides, so the few ms of detokenisation are left out of both.

Before any timing a sanity child loads both pipelines (in float32, whatever --dtype) and checks that (a) both
tokenize every prompt to the same ids and (b) a few greedy prompts generate the same ids and the same text; the
benchmark stops otherwise.

Configurations, each in its own subprocess with `torch.set_num_threads(--threads)`, after a warm-up, timed once:
- ours: `pipelines.pipeline("text-generation", folder)` with the pipeline's engine defaults (`batch_size`:
  sequences running at once, `max_batch_tokens`: prompt tokens prefilled per step; unset, they come from
  `pipelines.runtime.DEVICE_DEFAULTS` for the device, 64 and 2048 on CPU; the table shows the engine's values).
  All prompts are submitted at once, each with its own parameters, as concurrent callers would: one thread
  per prompt calling `pipe(prompt, max_new_tokens=m, min_new_tokens=m, do_sample=False, return_tensors=True)`;
  the calls share the pipeline's one engine loop. Timed from the first submit to the last result.
- hf-b{B}: `transformers.pipeline("text-generation", model=folder, dtype=...)` with pad_token = eos and left
  padding, at batch size B. A pipeline call takes one max_new_tokens, so the prompts are grouped by it and, within a
  group, sorted by length and cut into chunks of B, each one call `pipe(chunk, batch_size=B, max_new_tokens=m,
  min_new_tokens=m, do_sample=False, return_tensors=True)`. That is transformers' best case, arranged by hand
  here: no call mixes budgets, and length-sorted chunks pad little. The chunks run in a seeded random order
  until `--time-budget` seconds have passed (the chunk that crosses it finishes): a configuration that
  stops early ran a random subset, labelled "subset n/N" in the table; its tokens/s is measured on that
  subset and its full-set seconds are an extrapolation (seconds x all tokens / tokens done), marked "~".

Columns: generated tokens (of the prompts that ran), seconds (first submit to last result), tokens/s;
x best HF: this row's tokens/s over the best transformers row's; other CPU: CPU used by other processes during
the timed run, as a share of all cores (above a few percent the timing was disturbed; such a run is repeated
once); same ids: prompts whose generated ids equal ours (greedy on a random model: a rare near-tie in the logits
can flip one token between implementations and batch shapes and change the rest of that sequence).

`--profile` instead runs ours once in this process (after a warm-up) with timers on the engine's parts (model
forward in decode and prefill, the lm_head, token choice, KV-cache moves and growth) and torch.profiler's top
ops; the timers synchronise nothing, so on a GPU they measure launch time only.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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
    top_ops,
    wait_for_idle,
)

MODULE = "jobs.benchmarks.generation"
SEED = 6
PROMPT_TOKENS = (10, 300)
NEW_TOKENS = (16, 32, 64, 128, 256)
CHECKPOINT = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)
EOS = "<|endoftext|>"
TOKENIZER_TRAINED = 4096  # byte-level BPE entries trained on the corpus; the rest of the vocabulary is filler
SANITY_PROMPTS, SANITY_NEW_TOKENS = 3, 24
WARMUP = (4, 8)  # prompts, new tokens
HF_BATCH_SIZES = (1, 8, 16, 32)


# -- the checkpoint and the workload (parent) --------------------------------------------------------------------
def default_workdir() -> Path:
    return Path(tempfile.gettempdir()) / "benchmark_generation"


def checkpoint_folder(workdir: Path) -> Path:
    """The GPT-2-small shaped checkpoint in `workdir`, built unless the one there was built from this CHECKPOINT."""
    folder = workdir / "gpt2-small-random"
    stamp = json.dumps({**CHECKPOINT, "tokenizer_trained": TOKENIZER_TRAINED}, sort_keys=True)
    if (folder / "benchmark_stamp.json").is_file() and (folder / "benchmark_stamp.json").read_text() == stamp:
        return folder
    print(f"building the checkpoint in {folder} ...", file=sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    eos_id = write_tokenizer(folder, CHECKPOINT["vocab_size"])
    write_model(folder, eos_id)
    (folder / "benchmark_stamp.json").write_text(stamp)  # last: a half-built folder is rebuilt
    return folder


def fillers(taken: set[str], n: int) -> list[str]:
    """n byte-level strings of letters not in `taken`: "Ġaaa".."Ġzzz", "aaa".."zzz", "Ġaaaa", ... (Ġ is a space)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = (
        prefix + "".join(p)
        for size in (3, 4, 5)
        for prefix in ("Ġ", "")
        for p in itertools.product(letters, repeat=size)
    )
    return list(itertools.islice((w for w in words if w not in taken), n))


def write_tokenizer(folder: Path, vocab_size: int) -> int:
    """tokenizer.json (byte-level BPE of exactly vocab_size ids, EOS last), tokenizer_config.json and
    special_tokens_map.json as a GPT-2 checkpoint has them; returns the EOS id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from jobs.benchmarks.corpus import make_corpus

    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_TRAINED, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    trained.train_from_iterator(make_corpus(5000, seed=SEED), trainer=trainer)
    model = json.loads(trained.to_str())["model"]
    vocab = dict(model["vocab"])
    assert sorted(vocab.values()) == list(range(len(vocab))), "trained ids are not contiguous"
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    for word in fillers(set(vocab), vocab_size - 1 - len(vocab)):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    eos_id = tok.token_to_id(EOS)
    if tok.get_vocab_size() != vocab_size or eos_id != vocab_size - 1:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} ids and {EOS}={eos_id}; wanted {vocab_size}, last")
    tok.save(str(folder / "tokenizer.json"))
    specials = {"bos_token": EOS, "eos_token": EOS, "unk_token": EOS}
    added = {
        str(eos_id): {
            "content": EOS,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    }
    config = {
        **specials,
        "added_tokens_decoder": added,
        "model_max_length": CHECKPOINT["n_positions"],
        "padding_side": "right",
        "tokenizer_class": "GPT2Tokenizer",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    return eos_id


def write_model(folder: Path, eos_id: int) -> None:
    import torch
    import transformers

    config = transformers.GPT2Config(**CHECKPOINT, bos_token_id=eos_id, eos_token_id=eos_id)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)


def make_workload(folder: Path, n: int) -> list[dict]:
    """n prompts of PROMPT_TOKENS tokens (uniform) and a max_new_tokens each from NEW_TOKENS, seeded."""
    import tokenizers

    from jobs.benchmarks.corpus import make_corpus

    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    rng = random.Random(SEED)
    texts = iter(make_corpus(40 * n, seed=SEED, min_words=20))
    items = []
    for _ in range(n):
        target, words = rng.randint(*PROMPT_TOKENS), []
        while len(tok.encode(" ".join(words)).ids) < target:
            words.extend(next(texts).split())
        prompt = tok.decode(tok.encode(" ".join(words)).ids[:target])
        items.append(
            {"prompt": prompt, "prompt_tokens": len(tok.encode(prompt).ids), "max_new_tokens": rng.choice(NEW_TOKENS)}
        )
    return items


# -- child side ----------------------------------------------------------------------------------------------------
def load_ours(folder: Path, args):
    from pipelines import pipeline

    return pipeline(
        "text-generation",
        folder,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.ours_batch_size,
        max_batch_tokens=args.ours_max_batch_tokens,
    )


def run_ours(pipe, items: list[dict]) -> list[list[int]]:
    """Every prompt submitted at once, each by its own thread with its own parameters; the new ids of each."""

    def one(item):
        m = item["max_new_tokens"]
        (out,) = pipe(item["prompt"], max_new_tokens=m, min_new_tokens=m, do_sample=False, return_tensors=True)
        return out["generated_token_ids"][item["prompt_tokens"] :]

    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        return list(pool.map(one, items))


def engine_settings(pipe) -> dict:
    engine = pipe.loop.engine
    return {
        "batch_size": engine.max_sequences,
        "max_batch_tokens": engine.max_batch_tokens,
        "kv_cache_tokens": engine.kv_cache_tokens,
    }


def load_hf(folder: Path, args):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    pipe = transformers.pipeline(
        "text-generation", model=str(folder), device=args.device, dtype=getattr(torch, args.dtype)
    )
    pipe.tokenizer.pad_token = pipe.tokenizer.eos_token
    pipe.tokenizer.padding_side = "left"
    for config in (pipe.model.generation_config, getattr(pipe, "generation_config", None)):
        if config is not None:
            config.pad_token_id = pipe.tokenizer.eos_token_id
    return pipe


def hf_chunks(items: list[dict], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped by max_new_tokens, length-sorted within a group, cut into chunks of batch_size."""
    groups = defaultdict(list)
    for i, item in enumerate(items):
        groups[item["max_new_tokens"]].append(i)
    chunks = []
    for m in sorted(groups):
        ordered = sorted(groups[m], key=lambda i: items[i]["prompt_tokens"])
        chunks.extend(ordered[s : s + batch_size] for s in range(0, len(ordered), batch_size))
    return chunks


def run_hf_chunk(pipe, items: list[dict], chunk: list[int], batch_size: int, pad_id: int) -> list[list[int]]:
    """One transformers call on a chunk of prompts that share max_new_tokens; the new ids of each."""
    m = items[chunk[0]]["max_new_tokens"]
    outs = pipe(
        [items[i]["prompt"] for i in chunk],
        batch_size=batch_size,
        max_new_tokens=m,
        min_new_tokens=m,
        do_sample=False,
        return_tensors=True,
    )
    new = []
    for i, (out,) in zip(chunk, outs):
        ids = list(out["generated_token_ids"])
        pads = next(k for k, t in enumerate(ids) if t != pad_id)  # left padding (prompts never hold the eos id)
        new.append(ids[pads + items[i]["prompt_tokens"] :])
    return new


def run_child(name: str, args) -> None:
    """One configuration: load (timed), warm up, one timed run; writes NAME.json into the run folder."""
    import torch

    torch.set_num_threads(args.threads)
    setup = json.loads((args.run_dir / "setup.json").read_text(encoding="utf-8"))
    folder, items = Path(setup["folder"]), setup["items"]
    warm = [{**item, "max_new_tokens": WARMUP[1]} for item in items[: WARMUP[0]]]
    baseline = maxrss_mb()
    start = time.perf_counter()
    if name == "ours":
        pipe = load_ours(folder, args)
        load_s = time.perf_counter() - start
        run_ours(pipe, warm)
        order = list(range(len(items)))
        new, wall, other = timed(lambda: run_ours(pipe, items))
        extra = {"settings": engine_settings(pipe)}
    else:
        batch_size = int(name.removeprefix("hf-b"))
        pipe = load_hf(folder, args)
        load_s = time.perf_counter() - start
        pad_id = pipe.tokenizer.pad_token_id
        run_hf_chunk(pipe, warm, list(range(len(warm))), batch_size, pad_id)
        chunks = hf_chunks(items, batch_size)
        random.Random(SEED).shuffle(chunks)

        def run_budgeted():
            done, started = [], time.perf_counter()
            for chunk in chunks:
                if done and time.perf_counter() - started >= args.time_budget:
                    break
                done.append((chunk, run_hf_chunk(pipe, items, chunk, batch_size, pad_id)))
            return done

        done, wall, other = timed(run_budgeted)
        order = [i for chunk, _ in done for i in chunk]
        new = [ids for _, outs in done for ids in outs]
        extra = {"settings": {"batch_size": batch_size}, "chunks": len(done), "chunks_total": len(chunks)}
    wanted = [items[i]["max_new_tokens"] for i in order]
    wrong = [i for i, ids, m in zip(order, new, wanted) if len(ids) != m]
    if wrong:
        raise SystemExit(f"{name}: prompts {wrong[:5]} did not generate exactly max_new_tokens tokens")
    result = {
        "name": name,
        "kind": "ours" if name == "ours" else "hf",
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": args.dtype,
        "load_s": load_s,
        "run_s": wall,
        "other_cpu": other,
        "prompts": len(order),
        "tokens": sum(wanted),
        "peak_rss_mb": maxrss_mb(),
        "baseline_rss_mb": baseline,
        "new_ids": dict(zip(map(str, order), new)),
        **extra,
    }
    (args.run_dir / f"{name}.json").write_text(json.dumps(result), encoding="utf-8")


def run_sanity(args) -> None:
    """Same prompt ids for every prompt, then the same greedy ids and text for a few, in float32 whatever the
    timed dtype (in bfloat16 the two implementations' roundings differ, so greedy paths may part); writes
    sanity.json."""
    import torch

    torch.set_num_threads(args.threads)
    setup = json.loads((args.run_dir / "setup.json").read_text(encoding="utf-8"))
    folder, items = Path(setup["folder"]), setup["items"]
    fp32 = argparse.Namespace(**{**vars(args), "dtype": "float32"})
    ours, hf = load_ours(folder, fp32), load_hf(folder, fp32)
    prompts = [item["prompt"] for item in items]
    same_prompt_ids = 0
    for prompt, item in zip(prompts, items):
        mine, theirs = ours.tokenizer.encode(prompt).input_ids, hf.tokenizer(prompt)["input_ids"]
        same_prompt_ids += list(mine) == list(theirs) and len(mine) == item["prompt_tokens"]
    picks = sorted(range(len(items)), key=lambda i: items[i]["prompt_tokens"])
    picks = [picks[k * (len(picks) - 1) // max(1, SANITY_PROMPTS - 1)] for k in range(SANITY_PROMPTS)]
    params = dict(max_new_tokens=SANITY_NEW_TOKENS, min_new_tokens=SANITY_NEW_TOKENS, do_sample=False)
    checks = []
    for i in picks:
        for return_tensors in (True, False):
            kw = dict(params, return_tensors=True) if return_tensors else dict(params, return_full_text=False)
            key = "generated_token_ids" if return_tensors else "generated_text"
            mine, theirs = ours(prompts[i], **kw)[0][key], hf(prompts[i], **kw)[0][key]
            same = list(mine) == list(theirs) if return_tensors else mine == theirs
            checks.append(
                {
                    "prompt": i,
                    "what": "ids" if return_tensors else "text",
                    "same": same,
                    "ours": mine if return_tensors else mine[:80],
                    "hf": theirs if return_tensors else theirs[:80],
                }
            )
    result = {
        "same_prompt_ids": same_prompt_ids,
        "prompts": len(items),
        "checks": checks,
        "ok": same_prompt_ids == len(items) and all(c["same"] for c in checks),
    }
    (args.run_dir / "sanity.json").write_text(json.dumps(result), encoding="utf-8")


# -- profile (ours, in this process) -------------------------------------------------------------------------------
class Timers:
    """Seconds and calls per label; `wrap` times a callable, `hooks` a module's forward (pre-hook to hook)."""

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)
        self.phase = "decode"  # of the model pass running now: set by the model's pre-hook
        self._starts: dict[int, float] = {}

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] += seconds
        self.calls[label] += 1

    def wrap(self, label: str, fn):
        def timed_call(*a, **kw):
            start = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.add(label, time.perf_counter() - start)

        return timed_call

    def hooks(self, module, label: str) -> None:
        def pre(mod, args, kwargs):
            self._starts[id(mod)] = time.perf_counter()

        def post(mod, args, kwargs, output):
            self.add(f"{self.phase}: {label}", time.perf_counter() - self._starts.pop(id(mod)))

        module.register_forward_pre_hook(pre, with_kwargs=True)
        module.register_forward_hook(post, with_kwargs=True)


def instrument(engine, timers: Timers, shapes: dict) -> None:
    """Timers on the engine's parts (instance attributes only: the library code is unchanged)."""
    model = engine.model

    def phase(mod, args, kwargs):
        ids = args[0]
        decode = ids.shape[1] == 1 and kwargs.get("cache") is not None and not kwargs["cache"].prefill
        timers.phase = "decode" if decode else "prefill"
        if timers.phase == "decode":  # rows, and positions attended (the cache view) against the real ones
            shapes["decode rows"] += ids.shape[0]
            shapes["attended positions"] += ids.shape[0] * kwargs["cache"].length
            shapes["real positions"] += int((args[1] + 1).sum())
        else:
            shapes["prefill padded tokens"] += ids.numel()
            shapes["prefill real tokens"] += int(kwargs["lengths"].sum())

    model.register_forward_pre_hook(phase, with_kwargs=True, prepend=True)
    timers.hooks(model, "model forward")
    timers.hooks(model.lm_head, "lm_head")
    for block in model.transformer.h:
        timers.hooks(block.attn, "attention block (qkv + kv write + sdpa + proj)")
        timers.hooks(block.attn.c_attn, "attention c_attn (qkv linear)")
        timers.hooks(block.attn.c_proj, "attention c_proj (linear)")
        timers.hooks(block.mlp, "mlp")
    engine.step = timers.wrap("engine.step", engine.step)
    engine._decode = timers.wrap("engine._decode", engine._decode)
    engine._prefill = timers.wrap("engine._prefill", engine._prefill)
    engine.select = timers.wrap("select (processors + argmax)", engine.select)
    engine._release = timers.wrap("_release (incl. KV moves)", engine._release)
    engine._reserve_cache = timers.wrap("_reserve_cache (KV alloc/resize)", engine._reserve_cache)
    engine.cache.move = timers.wrap("KVCache.move", engine.cache.move)


def run_profile(args) -> None:
    """Ours once with timers on the engine's parts, then once under torch.profiler (top ops by self CPU time)."""
    import torch

    torch.set_num_threads(args.threads)
    folder = checkpoint_folder(args.workdir)
    items = make_workload(folder, args.prompts)
    pipe = load_ours(folder, args)
    run_ours(pipe, [{**item, "max_new_tokens": WARMUP[1]} for item in items[: WARMUP[0]]])
    timers, shapes = Timers(), defaultdict(int)
    instrument(pipe.loop.engine, timers, shapes)
    waited = wait_for_idle(args.wait_idle)
    _, wall, other = timed(lambda: run_ours(pipe, items))
    tokens = sum(item["max_new_tokens"] for item in items)
    print(
        f"ours, {len(items)} prompts, {tokens} tokens: {wall:.2f} s, {tokens / wall:.1f} tokens/s with timers "
        f"(other CPU {100 * other:.0f}%, waited {waited:.0f} s for an idle machine); {engine_settings(pipe)}"
    )
    rows = []
    for label in sorted(timers.seconds, key=lambda k: -timers.seconds[k]):
        s, n = timers.seconds[label], timers.calls[label]
        rows.append([label, f"{s:.2f}", f"{100 * s / wall:.1f}%", n, f"{1000 * s / n:.2f}"])
    steps = timers.seconds["engine.step"]
    forward = timers.seconds["decode: model forward"] + timers.seconds["prefill: model forward"]
    for label, s in (
        ("outside engine.step (loop thread waits, callers' threads, pre/postprocess)", wall - steps),
        ("engine.step minus model forwards (select, bookkeeping, KV moves, tensors from lists)", steps - forward),
    ):
        rows.append([label, f"{s:.2f}", f"{100 * s / wall:.1f}%", "", ""])
    print("\n" + "\n".join(markdown_table(["part", "seconds", "% of wall", "calls", "ms per call"], rows)))
    decodes = timers.calls["decode: model forward"]
    if decodes:
        print(
            f"\ndecode passes: {decodes}, mean rows {shapes['decode rows'] / decodes:.1f}; attended KV positions "
            f"{shapes['attended positions']} for {shapes['real positions']} real "
            f"({shapes['attended positions'] / max(1, shapes['real positions']):.2f}x)"
        )
    if shapes["prefill real tokens"]:
        padded, real = shapes["prefill padded tokens"], shapes["prefill real tokens"]
        print(
            f"prefill passes: {timers.calls['prefill: model forward']}, padded tokens {padded} for {real} real "
            f"({padded / real:.2f}x)"
        )
    ops = top_ops(lambda: drive_engine(pipe, items), row_limit=20)  # this thread's ops only: drive the engine here
    print("\ntorch.profiler, the same requests driven on this thread (engine.add, then engine.step until done):")
    print(ops)


def drive_engine(pipe, items: list[dict]) -> None:
    """The engine requests ours makes for `items`, stepped on the calling thread (the loop's thread sits idle:
    it wakes only for submitted commands), so that profilers that follow one thread see every op."""
    engine = pipe.loop.engine
    for i, item in enumerate(items):
        m = item["max_new_tokens"]
        params = dict(max_new_tokens=m, min_new_tokens=m, do_sample=False)
        (request,) = pipe.requests(pipe.preprocess_item(item["prompt"], i), params)[0]
        engine.add(
            ("profile", i),
            request["prompt_ids"],
            request["max_new_tokens"],
            request["eos_token_ids"],
            request["stop"],
            request["sampler_state"],
        )
    while engine.has_work():
        engine.step()


# -- parent side -----------------------------------------------------------------------------------------------------
def config_names(only: str | None, batch_sizes: list[int]) -> list[str]:
    """Config names from --only: ours, hf-bN for any N (not only those of --hf-batch-sizes), or the prefix hf."""
    known = ["ours", *(f"hf-b{b}" for b in batch_sizes)]

    def any_batch_size(name: str) -> bool:
        return name.startswith("hf-b") and name[4:].isdigit()

    return select_configs(only, known, accept=any_batch_size, hint=" (or hf-bN, or the prefix hf)")


def child_command(name: str, run_dir: Path, args) -> list[str]:
    options = ["--run-dir", run_dir, "--workdir", args.workdir, "--threads", args.threads, "--device", args.device]
    options += ["--dtype", args.dtype, "--time-budget", args.time_budget]
    if args.ours_batch_size is not None:
        options += ["--ours-batch-size", args.ours_batch_size]
    if args.ours_max_batch_tokens is not None:
        options += ["--ours-max-batch-tokens", args.ours_max_batch_tokens]
    return module_command(MODULE, "--child", name, *options)


def run_config(name: str, run_dir: Path, args) -> dict:
    """One configuration in its own subprocess, after waiting for an idle machine; run again once if disturbed."""
    return run_isolated(name, child_command(name, run_dir, args), run_dir / f"{name}.json", args.wait_idle)


def sanity(run_dir: Path, args) -> dict:
    spawn(child_command("sanity", run_dir, args))
    result = json.loads((run_dir / "sanity.json").read_text(encoding="utf-8"))
    checks = result["checks"]
    print(
        f"sanity: {result['same_prompt_ids']}/{result['prompts']} prompts tokenized to the same ids by both; "
        f"greedy {SANITY_NEW_TOKENS} new tokens on prompts {sorted({c['prompt'] for c in checks})}: "
        f"{sum(c['same'] for c in checks)}/{len(checks)} identical (ids and text)"
    )
    for c in checks:
        if not c["same"]:
            print(f"  prompt {c['prompt']} {c['what']} differ:\n    ours {c['ours']}\n    hf   {c['hf']}")
    return result


def add_agreement(results: list[dict]) -> None:
    """`same_ids`: prompts whose generated ids equal ours, over the prompts both ran (None without ours)."""
    ours = next((r for r in results if r["kind"] == "ours"), None)
    for r in results:
        if ours is None or r is ours:
            r["same_ids"], r["compared"] = None, 0
            continue
        common = [k for k in r["new_ids"] if k in ours["new_ids"]]
        r["same_ids"], r["compared"] = sum(r["new_ids"][k] == ours["new_ids"][k] for k in common), len(common)


def best_hf(results: list[dict]) -> dict | None:
    hf = [r for r in results if r["kind"] == "hf"]
    return max(hf, key=lambda r: r["tokens"] / r["run_s"]) if hf else None


def table(results: list[dict], n_prompts: int, all_tokens: int) -> list[str]:
    best = best_hf(results)
    header = (
        "configuration|settings|prompts|generated tokens|seconds|tokens/s|x best HF|other CPU|load s|peak RSS MB"
        "|same ids as ours"
    ).split("|")
    lines = []
    for r in results:
        rate = r["tokens"] / r["run_s"]
        if r["kind"] == "ours":
            s = r["settings"]
            label, settings = (
                "ours (continuous batching)",
                (f"{s['batch_size']} seqs, {s['max_batch_tokens']} prefill tok/step, KV {s['kv_cache_tokens']} tok"),
            )
        else:
            label = f"transformers pipeline b{r['settings']['batch_size']}"
            settings = "grouped by max_new, length-sorted"
        prompts, seconds = str(r["prompts"]), f"{r['run_s']:.1f}"
        if r["prompts"] < n_prompts:
            prompts = f"subset {r['prompts']}/{n_prompts} ({r['chunks']}/{r['chunks_total']} calls)"
            seconds += f" (full set ~{r['run_s'] * all_tokens / r['tokens']:.0f})"
        speedup = f"{rate / (best['tokens'] / best['run_s']):.2f}x" if best else "n/a"
        same = f"{r['same_ids']}/{r['compared']}" if r["same_ids"] is not None else "n/a"
        same = "(reference)" if r["kind"] == "ours" else same
        label += " (best HF)" if r is best else ""
        lines.append(
            [
                label,
                settings,
                prompts,
                r["tokens"],
                seconds,
                f"{rate:.1f}",
                speedup,
                f"{100 * r['other_cpu']:.0f}%",
                f"{r['load_s']:.1f}",
                f"{r['peak_rss_mb']:.0f}",
                same,
            ]
        )
    return markdown_table(header, lines)


def describe_machine(args) -> str:
    return machine(args.threads, args.device, args.dtype, peers=("transformers",))


def workload_line(items: list[dict]) -> str:
    lengths = [item["prompt_tokens"] for item in items]
    budgets = defaultdict(int)
    for item in items:
        budgets[item["max_new_tokens"]] += 1
    spread = ", ".join(f"{m}: {budgets[m]}" for m in sorted(budgets))
    return (
        f"{len(items)} prompts of {min(lengths)}..{max(lengths)} tokens ({sum(lengths)} in all, mean "
        f"{sum(lengths) / len(lengths):.0f}); max_new_tokens = min_new_tokens per prompt ({spread}); "
        f"{sum(item['max_new_tokens'] for item in items)} generated tokens in all; greedy"
    )


def report(args, items: list[dict], sane: dict, results: list[dict], elapsed: float) -> None:
    all_tokens = sum(item["max_new_tokens"] for item in items)
    print(f"\n{describe_machine(args)}\n{workload_line(items)}\n")
    print("\n".join(table(results, len(items), all_tokens)))
    ours, best = next((r for r in results if r["kind"] == "ours"), None), best_hf(results)
    if ours and best:
        speedup = (ours["tokens"] / ours["run_s"]) / (best["tokens"] / best["run_s"])
        subset = " (on its subset)" if best["prompts"] < len(items) else ""
        print(
            f"\nours vs transformers at its best batch size (b{best['settings']['batch_size']}{subset}): "
            f"{speedup:.2f}x tokens/s (target >= 3x): {'met' if speedup >= 3 else 'MISSED'}"
        )
    print(f"sanity before timing: {'passed' if sane['ok'] else 'FAILED'}; benchmark wall time {elapsed:.0f} s")


def main(argv: list[str] | None = None) -> dict | None:
    parser = argument_parser(MODULE, __doc__)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...: both sides")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="both sides")
    parser.add_argument("--hf-batch-sizes", default=",".join(map(str, HF_BATCH_SIZES)), metavar="B,B,...")
    parser.add_argument(
        "--time-budget",
        type=float,
        default=150.0,
        metavar="S",
        help="a transformers configuration starts no new call after S seconds (a subset, labelled)",
    )
    parser.add_argument("--ours-batch-size", type=int, help="sequences running at once (default: the pipeline's)")
    parser.add_argument(
        "--ours-max-batch-tokens", type=int, help="prompt tokens prefilled per step (default: the pipeline's)"
    )
    parser.add_argument("--only", help="comma-separated configurations: ours, hf-bN, or hf for all batch sizes")
    parser.add_argument(
        "--workdir", type=Path, help=f"where the checkpoint is built once (default {default_workdir()})"
    )
    add_timing_arguments(parser, wait_idle_s=60.0)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--profile", action="store_true", help="instead: profile ours (engine timers + torch.profiler)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workdir = args.workdir or default_workdir()
    if args.child == "sanity":
        return run_sanity(args)
    if args.child:
        return run_child(args.child, args)
    if args.profile:
        return run_profile(args)

    names = config_names(args.only, [int(b) for b in args.hf_batch_sizes.split(",") if b])
    started = time.perf_counter()
    folder = checkpoint_folder(args.workdir)
    items = make_workload(folder, args.prompts)
    with tempfile.TemporaryDirectory(prefix="bench-gen-") as tmp:
        run_dir = Path(tmp)
        (run_dir / "setup.json").write_text(json.dumps({"folder": str(folder), "items": items}), encoding="utf-8")
        sane = sanity(run_dir, args)
        if not sane["ok"]:
            raise SystemExit("sanity check failed: our pipeline and transformers' do not give the same ids; no timing")
        results = [run_config(name, run_dir, args) for name in names]
    add_agreement(results)
    elapsed = time.perf_counter() - started
    report(args, items, sane, results, elapsed)
    summary = {
        "command": command_line(MODULE, argv),
        "machine": describe_machine(args),
        "workload": [{k: v for k, v in item.items() if k != "prompt"} for item in items],
        "generated_tokens": sum(item["max_new_tokens"] for item in items),
        "sanity": sane,
        "elapsed_s": elapsed,
        "results": [{k: v for k, v in r.items() if k != "new_ids"} for r in results],
    }
    return save_json(args.json, summary)


if __name__ == "__main__":
    main()
