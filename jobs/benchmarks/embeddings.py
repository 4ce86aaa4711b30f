"""Benchmark sentence embeddings on CPU: our pipeline (fp32, bf16) against sentence-transformers and transformers.

    python -m jobs.benchmarks.embeddings [--texts 2000] [--threads 2] [--repeats 1] [--only NAME,...] [--json OUT]
                                         [--repeat-budget 30] [--wait-idle 120] [--profile NAME]

Every configuration (the CONFIGS table) runs in a subprocess of its own, on the same texts
(`make_corpus(texts, seed=1)`) and the same `torch.set_num_threads`: import, load the model (timed), warm up
on 64 texts, then the timed run over all texts: the best of `--repeats` runs, or of fewer where another run
would take the configuration's timed total past `--repeat-budget` seconds (slow configurations run once).
The child saves its embeddings (float32 .npy) and its measurements (JSON); the parent waits for an idle
machine before each child, runs a disturbed one again once, and prints one markdown table and the targets.

Definitions used in the table:
- tokens: real tokens (special tokens included, no padding), counted once with the model's tokenizer.json
  truncated at 256 (the model's max_seq_length); FLOPs are counted on those real tokens only, per layer
  2*T*(4*H*H + 2*H*I) for the linear layers + 2*2*T*T*H for attention scores and the weighted sum.
- % floor: achieved GFLOP/s over the nominal peak of the run's dtype (NOMINAL_PEAK_GFLOPS); the matmul
  peak this machine actually gives is measured first (2048x2048, same threads) and printed next to it.
- padded: tokens the model actually ran (input_ids.numel() summed by a forward pre-hook) over real tokens.
- other CPU: CPU time used by other processes during the timed run (/proc/stat minus our own rusage),
  as a share of all cores: anything above a few percent means the timings were disturbed.
- peak RSS: ru_maxrss at the end of the child; delta: over ru_maxrss right after the imports.
- cosine: min over texts of the cosine with sentence-transformers fp32's embedding of the same text.
- batch "defaults": the pipeline's own micro-batch limits (its `batch_size` / `max_batch_tokens`, from
  `pipelines.runtime.DEVICE_DEFAULTS` for the CPU), read from the pipeline in the child.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from jobs.benchmarks.harness import (
    TokenCounter,
    add_timing_arguments,
    argument_parser,
    best_of,
    command_line,
    machine,
    markdown_table,
    maxrss_mb,
    minilm_folder,
    module_command,
    run_isolated,
    save_json,
    select_configs,
    spawn,
    top_ops,
    wait_for_idle,
)

MODULE = "jobs.benchmarks.embeddings"
SEED = 1
WARMUP_TEXTS = 64
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
NOMINAL_PEAK_GFLOPS = {"float32": 150.0, "bfloat16": 790.0}  # 2 threads on this 2-core machine
REFERENCE = "st-fp32"
HF_BATCH_SIZES = (1, 8, 32, 64)

# name -> what the child builds. kind: ours | st (sentence-transformers) | hf (transformers.pipeline).
CONFIGS: dict[str, dict] = {
    "ours-fp32": dict(kind="ours", dtype="float32", batch_size=None),  # the pipeline's defaults
    "ours-bf16": dict(kind="ours", dtype="bfloat16", batch_size=None),
    "ours-fp32-b32": dict(kind="ours", dtype="float32", batch_size=32, max_batch_tokens=10**9),  # no token budget
    "st-fp32": dict(kind="st", dtype="float32", batch_size=32),
    "st-bf16": dict(kind="st", dtype="bfloat16", batch_size=32),
    **{f"hf-pipeline-b{b}": dict(kind="hf", dtype="float32", batch_size=b) for b in HF_BATCH_SIZES},
}
LABELS = {"ours": "ours", "st": "sentence-transformers", "hf": "transformers pipeline"}
PEERS = ("sentence_transformers", "transformers")  # the libraries compared with, whose versions the report names


# -- child side ------------------------------------------------------------------------------------------
# A builder returns (run: texts -> float32 (N, H) array, a TokenCounter on the embeddings layer, its truncation
# length, the micro-batch limits it runs with: {"batch_size", "max_batch_tokens"}, None where it has none).
def build_ours(folder: Path, spec: dict, texts: list[str]):
    from pipelines import pipeline

    embed = pipeline(
        "sentence-embeddings",
        model=folder,
        dtype=spec["dtype"],
        batch_size=spec["batch_size"],
        max_batch_tokens=spec.get("max_batch_tokens"),
    )
    counter = TokenCounter(embed.model.embeddings)
    limits = {"batch_size": embed.batch_size, "max_batch_tokens": embed.max_batch_tokens}

    def run(batch):
        return np.stack([v.numpy() for v in embed(batch, return_tensors=True)])

    return run, counter, embed.max_length, limits


def build_st(folder: Path, spec: dict, texts: list[str]):
    import torch
    from sentence_transformers import SentenceTransformer

    kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if spec["dtype"] == "bfloat16" else {}
    model = SentenceTransformer(str(folder), device="cpu", **kwargs)
    counter = TokenCounter(model[0].auto_model.embeddings)  # ST calls the model's forward directly: no hooks

    def run(batch):
        vectors = model.encode(batch, batch_size=spec["batch_size"], convert_to_tensor=True, show_progress_bar=False)
        return vectors.float().numpy()

    return run, counter, model.max_seq_length, {"batch_size": spec["batch_size"], "max_batch_tokens": None}


def build_hf(folder: Path, spec: dict, texts: list[str]):
    """transformers.pipeline('feature-extraction') with truncation=True (which cuts at the tokenizer's
    model_max_length, 512, not at tokenizer.json's 128; its fixed padding to 128 is not applied either).
    Mean pooling and L2 normalisation run inside the timing, on each text's first n rows (right padding);
    the n per text come from the pipeline's own tokenizer, counted here (in the load time, not the run)."""
    import torch
    import torch.nn.functional as F
    import transformers

    pipe = transformers.pipeline("feature-extraction", model=str(folder), device="cpu", dtype=torch.float32)
    counter = TokenCounter(pipe.model.embeddings)
    lengths = {t: len(pipe.tokenizer(t, truncation=True)["input_ids"]) for t in texts}  # before the timing

    def run(batch):
        outputs = pipe(batch, batch_size=spec["batch_size"], truncation=True, return_tensors=True)
        vectors = torch.stack([o[0, : lengths[t]].mean(dim=0) for o, t in zip(outputs, batch)])  # (N, H)
        return F.normalize(vectors, dim=-1).numpy()

    return run, counter, pipe.tokenizer.model_max_length, {"batch_size": spec["batch_size"], "max_batch_tokens": None}


BUILDERS = {"ours": build_ours, "st": build_st, "hf": build_hf}


def run_child(name: str, n_texts: int, threads: int, repeats: int, repeat_budget_s: float, workdir: Path) -> None:
    import torch

    torch.set_num_threads(threads)
    spec = CONFIGS[name]
    if spec["kind"] == "ours":
        import pipelines  # noqa: F401
    elif spec["kind"] == "st":
        import sentence_transformers  # noqa: F401
    else:
        import transformers  # noqa: F401
    from jobs.benchmarks.corpus import make_corpus

    texts = make_corpus(n_texts, seed=SEED)
    baseline = maxrss_mb()
    start = time.perf_counter()
    run, counter, max_length, limits = BUILDERS[spec["kind"]](minilm_folder(), spec, texts)
    load_s = time.perf_counter() - start
    run(texts[:WARMUP_TEXTS])
    timings = best_of(lambda: run(texts), repeats, repeat_budget_s, before_each=lambda: setattr(counter, "tokens", 0))
    vectors = timings.result
    np.save(workdir / f"{name}.npy", vectors.astype(np.float32))
    result = {
        "name": name,
        **spec,
        "limits": limits,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        **timings.fields(),
        "tokens_run": counter.tokens,
        "texts": len(vectors),
        "peak_rss_mb": maxrss_mb(),
        "baseline_rss_mb": baseline,
        "max_length": max_length,
    }
    (workdir / f"{name}.json").write_text(json.dumps(result))


def run_peak(threads: int, workdir: Path) -> None:
    """GFLOP/s of a 2048x2048 matmul loop per dtype: what this machine gives at this thread count."""
    import torch

    torch.set_num_threads(threads)
    n, peaks = 2048, {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        iters, start = 0, time.perf_counter()
        while time.perf_counter() - start < 2.0:
            a @ b
            iters += 1
        peaks[str(dtype).removeprefix("torch.")] = 2 * n**3 * iters / (time.perf_counter() - start) / 1e9
    (workdir / "peak.json").write_text(json.dumps(peaks))


def run_profile(name: str, n_texts: int, threads: int) -> None:
    """torch.profiler over one run of `name` on `n_texts` texts (after a warm-up): the top ops by self CPU time."""
    import torch

    from jobs.benchmarks.corpus import make_corpus

    torch.set_num_threads(threads)
    texts = make_corpus(n_texts, seed=SEED)
    run, _, _, _ = BUILDERS[CONFIGS[name]["kind"]](minilm_folder(), CONFIGS[name], texts)
    run(texts[:WARMUP_TEXTS])
    print(top_ops(lambda: run(texts)))


# -- parent side -------------------------------------------------------------------------------------------
def model_shape(folder: Path) -> tuple[int, int, int]:
    config = json.loads((folder / "config.json").read_text())
    return config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]


def count_tokens(folder: Path, texts: list[str]) -> list[int]:
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(MAX_TOKENS)
    return [len(e.ids) for e in tokenizer.encode_batch([t.strip() for t in texts])]


def flops(lengths: list[int], layers: int, hidden: int, intermediate: int) -> float:
    per_layer = sum(2 * t * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * t * t * hidden for t in lengths)
    return float(per_layer * layers)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def select(only: str | None) -> list[str]:
    """Config names from --only: exact names, else prefixes ('hf-pipeline' selects every batch size)."""
    names = select_configs(only, list(CONFIGS), hint=" (or the prefix hf-pipeline)")
    if REFERENCE not in names:
        print(f"note: {REFERENCE} not selected: no speed-up, cosine or targets", file=sys.stderr)
    return names


def run_config(name: str, workdir: Path, common: list[str], wait_idle_s: float) -> dict:
    """One configuration in its own subprocess, after waiting for an idle machine; run again once if disturbed."""
    command = module_command(MODULE, "--child", name, "--workdir", workdir, *common)
    result = run_isolated(name, command, workdir / f"{name}.json", wait_idle_s)
    kind = result["kind"]
    variant = f"b{result['batch_size']}" if kind == "hf" else name.split("-", 1)[1]
    return {**result, "label": f"{LABELS[kind]} {variant}"}


def add_cosines(results: list[dict], workdir: Path) -> None:
    """`min_cos`: min over texts of the cosine with the reference's embedding of the same text (None without it)."""
    names = {r["name"] for r in results}
    reference = np.load(workdir / f"{REFERENCE}.npy") if REFERENCE in names else None
    for r in results:
        r["min_cos"] = None if reference is None else min_cosine(np.load(workdir / f"{r['name']}.npy"), reference)


def best_hf(results: list[dict]) -> list[dict]:
    """The rows to show: every configuration, but only the fastest batch size of the transformers pipeline."""
    hf = [r for r in results if r["kind"] == "hf"]
    best = min(hf, key=lambda r: r["run_s"]) if hf else None
    return [r for r in results if r["kind"] != "hf" or r is best]


def table(results: list[dict], n_tokens: int, total_flops: float) -> list[str]:
    reference = next((r for r in results if r["name"] == REFERENCE), None)
    header = (
        "name|dtype|batch|load s|run s (n)|texts/s|tokens/s|GFLOP/s|% floor|padded|other CPU|peak RSS MB (delta)"
        "|x ST fp32|min cos vs ST fp32"
    ).split("|")
    rows = []
    for r in best_hf(results):
        if r["batch_size"] is None:
            limits = r["limits"]
            batch = f"defaults ({limits['batch_size']}, <= {limits['max_batch_tokens']} tok)"
        else:
            budget = r.get("max_batch_tokens")
            batch = str(r["batch_size"]) + (f", <= {budget} tok" if budget and budget < 10**9 else ", no budget")
        gflops = total_flops / r["run_s"] / 1e9
        rows.append(
            [
                r["label"],
                r["dtype"],
                batch,
                f"{r['load_s']:.2f}",
                f"{r['run_s']:.2f} ({len(r['runs_s'])})",
                f"{r['texts'] / r['run_s']:.1f}",
                f"{n_tokens / r['run_s']:.0f}",
                f"{gflops:.1f}",
                f"{100 * gflops / NOMINAL_PEAK_GFLOPS[r['dtype']]:.0f}%",
                f"{r['tokens_run'] / n_tokens:.2f}x",
                f"{100 * r['other_cpu']:.0f}%",
                f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['baseline_rss_mb']:+.0f})",
                f"{reference['run_s'] / r['run_s']:.2f}x" if reference else "n/a",
                "n/a" if r["min_cos"] is None else f"{r['min_cos']:.6f}",
            ]
        )
    return markdown_table(header, rows)


# (our configuration, what it is compared with, the speed-up wanted, the min cosine wanted)
TARGETS = [
    ("ours-fp32", "st-fp32", 1.0, 0.99999),
    ("ours-bf16", "st-fp32", 3.5, 0.999),
    ("ours-bf16", "st-bf16", 1.5, 0.999),
    ("ours-fp32", "hf-pipeline", 3.0, None),
    ("ours-bf16", "hf-pipeline", 3.0, None),
]


def targets(results: list[dict]) -> list[str]:
    """One line per target whose two sides both ran: the speed-up (and cosine) against what is wanted."""
    by_name = {r["name"]: r for r in results}
    hf = [r for r in results if r["kind"] == "hf"]
    if hf:
        by_name["hf-pipeline"] = min(hf, key=lambda r: r["run_s"])
    lines = []
    for ours, other, speedup_wanted, cosine_wanted in TARGETS:
        if ours not in by_name or other not in by_name:
            continue
        speedup = by_name[other]["run_s"] / by_name[ours]["run_s"]
        ok = speedup >= speedup_wanted
        line = f"- {ours} vs {by_name[other]['label']}: {speedup:.2f}x (target >= {speedup_wanted}x)"
        if cosine_wanted is not None and by_name[ours]["min_cos"] is not None:
            ok = ok and by_name[ours]["min_cos"] >= cosine_wanted
            line += f", min cos {by_name[ours]['min_cos']:.6f} (target >= {cosine_wanted})"
        lines.append(f"{line}: {'met' if ok else 'MISSED'}")
    return lines


def main(argv: list[str] | None = None) -> dict | None:
    parser = argument_parser(MODULE, __doc__)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    add_timing_arguments(parser, wait_idle_s=120.0, repeats=1, repeat_budget_s=30.0)
    parser.add_argument("--only", help=f"comma-separated configurations; known: {', '.join(CONFIGS)}")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--profile", metavar="NAME", help="instead: profile one configuration and print its top ops")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "peak":
        return run_peak(args.threads, args.workdir)
    if args.child:
        return run_child(args.child, args.texts, args.threads, args.repeats, args.repeat_budget, args.workdir)
    if args.profile:
        if args.profile not in CONFIGS:
            raise SystemExit(f"unknown configuration {args.profile!r}; known: {', '.join(CONFIGS)}")
        wait_for_idle(args.wait_idle)
        return run_profile(args.profile, args.texts, args.threads)

    from jobs.benchmarks.corpus import make_corpus

    names = select(args.only)
    folder = minilm_folder()
    lengths = count_tokens(folder, make_corpus(args.texts, seed=SEED))
    n_tokens, total_flops = sum(lengths), flops(lengths, *model_shape(folder))
    common = ["--texts", args.texts, "--threads", args.threads, "--repeats", args.repeats]
    common += ["--repeat-budget", args.repeat_budget]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-emb-") as tmp:
        wait_for_idle(args.wait_idle)
        spawn(module_command(MODULE, "--child", "peak", "--threads", args.threads, "--workdir", tmp))
        peaks = json.loads((Path(tmp) / "peak.json").read_text())
        results = [run_config(name, Path(tmp), common, args.wait_idle) for name in names]
        add_cosines(results, Path(tmp))
    elapsed = time.perf_counter() - started

    described = machine(args.threads, peers=PEERS)
    report(args, described, lengths, total_flops, peaks, results, elapsed)
    summary = {
        "command": command_line(MODULE, argv),
        "machine": described,
        "texts": args.texts,
        "tokens": n_tokens,
        "gflop": total_flops / 1e9,
        "threads": args.threads,
        "repeats": args.repeats,
        "measured_peak_gflops": peaks,
        "nominal_peak_gflops": NOMINAL_PEAK_GFLOPS,
        "results": results,
        "elapsed_s": elapsed,
    }
    return save_json(args.json, summary)


def report(
    args, described: str, lengths: list[int], total_flops: float, peaks: dict, results: list[dict], elapsed: float
) -> None:
    n_tokens = sum(lengths)
    print(described)
    print(
        f"{args.texts} texts, {n_tokens} real tokens (mean {n_tokens / len(lengths):.1f}, max {max(lengths)}), "
        f"{total_flops / 1e9:.0f} GFLOP; {args.threads} threads; best of up to {args.repeats} timed run(s), "
        f"within {args.repeat_budget:.0f} s per configuration"
    )
    print(
        f"measured matmul peak (2048x2048): fp32 {peaks['float32']:.0f}, bf16 {peaks['bfloat16']:.0f} GFLOP/s; "
        f"% floor uses fp32 {NOMINAL_PEAK_GFLOPS['float32']:.0f}, bf16 {NOMINAL_PEAK_GFLOPS['bfloat16']:.0f}\n"
    )
    print("\n".join(table(results, n_tokens, total_flops)))
    truncation = sorted({(LABELS[r["kind"]], r["max_length"]) for r in results})
    print(
        "\ntruncation length: "
        + ", ".join(f"{label} {length}" for label, length in truncation)
        + f"; the longest text has {max(lengths)} tokens"
    )
    hf = [r for r in results if r["kind"] == "hf"]
    if hf:
        runs = [f"b{r['batch_size']} {r['run_s']:.2f} s ({r['tokens_run'] / n_tokens:.2f}x padded)" for r in hf]
        print("transformers pipeline, every batch size: " + ", ".join(runs))
    if lines := targets(results):
        print("\ntargets:\n" + "\n".join(lines))
    print(f"\nbenchmark wall time {elapsed:.0f} s")


if __name__ == "__main__":
    main()
