"""Benchmark image classification on CPU: ours (fp32, bf16) against transformers.pipeline, and the Ray job against
in process, in one run.

    python -m jobs.benchmarks.images [--images 2000] [--threads 2] [--hf-batch-sizes 1,8,32] [--time-budget 120]
                                     [--only ours-fp32,hf-b8,ray-bf16] [--images-dir DIR] [--wait-idle 60] [--json OUT]

Workload (seed SEED): `--images` JPEG files (quality 90) of mixed sizes, width and height each drawn from
256..2048 px, smooth random content with noise (so that they compress as photographs do, not as flat color),
written once into `--images-dir` (default: a temporary folder; an existing folder with the right files is
reused). The model: a ViT-base shaped random ViTForImageClassification (12 layers, hidden 768, 12 heads, MLP 3072,
patch 16, 224 x 224, 1,000 labels) with ViTImageProcessor's defaults (resize to 224 x 224 bilinear, rescale,
normalize), written with transformers' save_pretrained. Both sides read the same files by path.

Configurations, each in a child process of its own with `--threads` torch threads, after a warm-up on WARMUP
images:
- ours-fp32, ours-bf16: `pipeline("image-classification", model=..., dtype=...)` over every path (its default
  batching; OURS_CHUNK paths per call, or as many chunks as `--ours-time-budget` seconds allow), timed once. Then, on the first BREAKDOWN images, where the time goes, phase by phase: decode
  (`load_image`: file read, Pillow decode, EXIF, RGB), resize (`processor.prepare_image`: resize, crop, uint8
  pixels), model (`pipe.forward` on batches of 32 prepared images: normalization and the model).
- hf-b1, hf-b8, hf-b32: `transformers.pipeline("image-classification", model=..., device="cpu")` (float32, its PIL
  image processor: torchvision is not installable beside the CPU torch build) called on chunks of CHUNK paths
  with `batch_size=b`, until `--time-budget` seconds have passed: images/s over the images it did.
  hf-bf16-b8 (only when named) is the same with dtype=bfloat16.
- ray-fp32, ray-bf16: the same files as a Ray job: `python -m cluster.local up` (head only, all CPUs), `ray job
  submit -- python -m jobs.infer --task image-classification --input-format images` (its defaults: the preprocess
  tasks decode and resize, the model actor gets uint8 pixels), then `down`. "work s" is the job's own time (plan
  to the last part written: actor start and model load included); in process, the same span is the pipeline's
  load plus its run. Ray/in process compares the two for the same dtype. ray-read-images-bf16 (only when named):
  the alternative reading, a driver calling `run_pipeline` over `ray.data.read_images(mode="RGB")` (decoded in the
  read tasks; the pipeline's preprocess then takes arrays), timed from the plan to its last row.

Columns: images/s over the timed images; "x hf fp32 (best)" against the best hf-b* row (float32), "x hf bf16 b8"
against hf-bf16-b8; "same top-1 as hf fp32": images whose best label equals transformers' (float32, over the images
both did); peak RSS (ru_maxrss of the child: for ours at the end of the timed run, before the breakdown; for Ray,
the model actor is not this process: not reported); other CPU: the share of all cores that other processes used
during the timed run (above a few percent the timing was disturbed; the child runs again once).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jobs.benchmarks.harness import (
    ROOT,
    add_timing_arguments,
    argument_parser,
    busy_cpu_seconds,
    command_line,
    machine,
    markdown_table,
    maxrss_mb,
    module_command,
    run_isolated,
    save_json,
    select_configs,
    timed,
    wait_for_idle,
)

MODULE = "jobs.benchmarks.images"
SEED = 5
SIDE_RANGE = (256, 2048)
WARMUP = 8
BREAKDOWN = 128
CHUNK = 32
OURS_CHUNK = 256  # paths per pipeline call in ours' timed run: two of its micro-batches (128 images on CPU)
HF_BATCH_SIZES = (1, 8, 32)
VIT_BASE = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, image_size=224, patch_size=16
)
NUM_LABELS = 1000
OURS = {"ours-fp32": "float32", "ours-bf16": "bfloat16"}
RAY = {"ray-fp32": "float32", "ray-bf16": "bfloat16", "ray-read-images-bf16": "bfloat16"}
OPTIONAL = ("hf-bf16-b8", "ray-read-images-bf16")


# -- the workload --------------------------------------------------------------------------------------------------
def make_images(folder: Path, n: int) -> list[Path]:
    """`n` JPEGs of SIDE_RANGE sides in `folder` (kept when already there): a 12 x 12 random grid upsampled
    bicubically, plus pixel noise."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)
    paths = []
    for i in range(n):
        width, height = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2))
        grid = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
        noise_seed = int(rng.integers(2**31))
        path = folder / f"img{i:05d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        image = Image.fromarray(grid).resize((width, height), Image.Resampling.BICUBIC)
        noise = np.random.default_rng(noise_seed).integers(-12, 13, size=(height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return paths


def make_model(folder: Path) -> Path:
    """The ViT-base shaped random classifier with its preprocessor_config.json (kept when already there)."""
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    import transformers

    labels = {i: f"class_{i}" for i in range(NUM_LABELS)}
    config = transformers.ViTConfig(**VIT_BASE, id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(SEED)
    transformers.ViTForImageClassification(config).eval().save_pretrained(folder)
    processor = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    processor().save_pretrained(folder)
    return folder


# -- child side ------------------------------------------------------------------------------------------------------
def child_ours(name: str, model: Path, paths: list[str], threads: int, budget_s: float | None) -> dict:
    import torch

    from pipelines import pipeline
    from pipelines.images import load_image

    torch.set_num_threads(threads)
    (pipe, load_s, _) = timed(lambda: pipeline("image-classification", model=str(model), dtype=OURS[name]))
    pipe(paths[:WARMUP])

    def run():
        answers, start = [], time.perf_counter()
        while len(answers) < len(paths) and (budget_s is None or time.perf_counter() - start < budget_s):
            answers.extend(pipe(paths[len(answers) : len(answers) + OURS_CHUNK], top_k=1))
        return answers

    answers, run_s, other = timed(run)
    run_rss = maxrss_mb()  # before the breakdown, which holds BREAKDOWN decoded full-size images at once
    sample = paths[:BREAKDOWN]
    images, decode_s, _ = timed(lambda: [load_image(p) for p in sample])
    pixels, resize_s, _ = timed(lambda: [pipe.processor.prepare_image(image) for image in images])

    def model_pass():
        for i in range(0, len(pixels), CHUNK):
            pipe.forward({"pixels": torch.stack(pixels[i : i + CHUNK])})

    _, model_s, _ = timed(model_pass)
    per_image = {k: 1000 * v / len(sample) for k, v in (("decode", decode_s), ("resize", resize_s), ("model", model_s))}
    return {
        "images": len(answers),
        "run_s": run_s,
        "load_s": load_s,
        "other_cpu": other,
        "top1": [a[0]["label"] for a in answers],
        "breakdown_ms": per_image,
        "batch_size": pipe.batch_size,
        "peak_rss_mb": run_rss,
    }


def child_hf(name: str, model: Path, paths: list[str], threads: int, budget_s: float) -> dict:
    import torch
    import transformers

    torch.set_num_threads(threads)
    batch_size = int(name.rsplit("-b", 1)[1])
    dtype = torch.bfloat16 if "bf16" in name else torch.float32
    build = lambda: transformers.pipeline("image-classification", model=str(model), device="cpu", dtype=dtype)  # noqa: E731
    (pipe, load_s, _) = timed(build)
    pipe(paths[:WARMUP], batch_size=min(batch_size, WARMUP))

    def run():
        done, start = [], time.perf_counter()
        while len(done) < len(paths) and time.perf_counter() - start < budget_s:
            chunk = paths[len(done) : len(done) + CHUNK]
            done.extend(out[0]["label"] for out in pipe(chunk, batch_size=batch_size, top_k=1))
        return done

    top1, run_s, other = timed(run)
    return {"images": len(top1), "run_s": run_s, "load_s": load_s, "other_cpu": other, "top1": top1}


def child(args) -> None:
    paths = json.loads(Path(args.paths_file).read_text())
    if args.child in OURS:
        result = child_ours(args.child, Path(args.model), paths, args.threads, args.ours_time_budget)
    else:
        result = child_hf(args.child, Path(args.model), paths, args.threads, args.time_budget)
    result.setdefault("peak_rss_mb", maxrss_mb())
    Path(args.result).write_text(json.dumps(result))


# -- the Ray job -------------------------------------------------------------------------------------------------------
def as_ray_job(name: str, model: Path, images: Path, out: Path, threads: int) -> dict:
    """One Ray row on a fresh local cluster: `jobs.infer` submitted as a job, or (ray-read-images-*) a driver
    running `run_pipeline` over `ray.data.read_images`, the alternative to reading the files' bytes."""
    from cluster import local

    folder = tempfile.mkdtemp(prefix="rpb-img-")
    local.up(folder)
    try:
        env = {**os.environ, **local.env(folder)}
        if name.startswith("ray-read-images"):
            command = module_command(MODULE, "--read-images-driver", name, "--model", model, "--images-dir", images)
            command += ["--result", str(out / f"{name}.json")]
        else:
            submit = ["ray.scripts.scripts", "job", "submit", "--runtime-env", "cluster/runtime_env.yaml", "--"]
            job = ["jobs.infer", "--task", "image-classification", "--model", model, "--dtype", RAY[name]]
            job += ["--input", images / "*.jpg", "--input-format", "images", "--output", out / name]
            job += ["--errors", out / f"{name}-errors", "--params", '{"top_k": 1}']
            command = module_command(*submit, *module_command(*job))
        busy = busy_cpu_seconds()
        result, wall, _ = timed(lambda: subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True))
        if result.returncode != 0:
            raise SystemExit(f"{name}: the Ray job failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        cpu_s = busy_cpu_seconds() - busy
    finally:
        local.down(folder)
    if name.startswith("ray-read-images"):
        summary = json.loads((out / f"{name}.json").read_text())
    else:
        summary = json.loads((out / name / "_summary.json").read_text())
    return {
        "images": summary["rows_in"],
        "run_s": summary["wall_s"],
        "wall_s": wall,
        "machine_busy_cpu_s": cpu_s,
        "workers": summary.get("workers"),
        "stage_busy_s": summary.get("stage_busy_s"),
        "errors": summary["rows_in"] - summary["rows_out"],
        "other_cpu": 0.0,
    }


def read_images_driver(name: str, model: Path, images: Path, result: Path) -> None:
    """`run_pipeline` over `ray.data.read_images` (decoded to RGB arrays in the read tasks), from a driver on the
    cluster of RAY_ADDRESS: its time from building the plan to the last row, as jobs.infer's summary counts."""
    import ray
    import ray.data

    from pipelines.distributed import run_pipeline

    ray.init(logging_level="WARNING")
    start = time.perf_counter()
    ds = ray.data.read_images(str(images), mode="RGB", include_paths=True)
    out = run_pipeline(
        ds, "image-classification", model=str(model), column="image", id_column="path", dtype=RAY[name],
        keep_input=False, on_error="record", top_k=1,
    )  # fmt: skip
    rows = errors = 0
    for batch in out.iter_batches(batch_size=256, batch_format="pyarrow"):
        rows += batch.num_rows
        errors += batch.num_rows - batch.column("error").null_count
    wall = time.perf_counter() - start
    result.write_text(json.dumps({"rows_in": rows, "rows_out": rows - errors, "wall_s": wall}))


# -- parent side -------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argument_parser(MODULE, __doc__)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--hf-batch-sizes", default=",".join(map(str, HF_BATCH_SIZES)))
    parser.add_argument("--time-budget", type=float, default=120.0, help="seconds each transformers row runs")
    parser.add_argument(
        "--ours-time-budget", type=float, help="seconds each of ours' in-process rows runs (default: all images)"
    )
    parser.add_argument("--only", help="comma-separated configurations (prefixes select families)")
    parser.add_argument("--images-dir", help="where the JPEGs are written (reused when already there)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--paths-file", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--read-images-driver", help=argparse.SUPPRESS)
    add_timing_arguments(parser, wait_idle_s=60.0)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    if args.read_images_driver:
        return read_images_driver(args.read_images_driver, Path(args.model), Path(args.images_dir), Path(args.result))

    hf = [f"hf-b{b}" for b in map(int, args.hf_batch_sizes.split(","))]
    known = [*OURS, *hf, *OPTIONAL, *RAY]
    names = select_configs(args.only, known, optional=OPTIONAL)
    work = Path(tempfile.mkdtemp(prefix="bench-images-"))
    images = Path(args.images_dir) if args.images_dir else work / "images"
    start = time.perf_counter()
    paths = make_images(images, args.images)
    print(f"{len(paths)} images in {images} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    model = make_model(work / "vit-base")
    paths_file = work / "paths.json"
    paths_file.write_text(json.dumps([str(p) for p in paths]))

    results = {}
    for name in names:
        if name in RAY:
            wait_for_idle(args.wait_idle)
            print(f"running {name} ...", file=sys.stderr, flush=True)
            results[name] = as_ray_job(name, model, images, work, args.threads)
            continue
        result_file = work / f"{name}.json"
        command = module_command(
            MODULE, "--child", name, "--model", model, "--paths-file", paths_file, "--result", result_file,
            "--threads", args.threads, "--time-budget", args.time_budget,
            *(("--ours-time-budget", args.ours_time_budget) if args.ours_time_budget else ()),
        )  # fmt: skip
        results[name] = run_isolated(name, command, result_file, args.wait_idle)

    lines = report(results, args)
    print("\n".join(lines))
    summary = {"command": command_line(MODULE, argv), "machine": lines[0], "results": results}
    return save_json(args.json, summary)


def report(results: dict, args) -> list[str]:
    def rate_of(r):
        return r["images"] / r["run_s"]

    fp32_rows = [r for n, r in results.items() if re.fullmatch(r"hf-b\d+", n)]  # transformers float32
    best_hf = max(fp32_rows, key=rate_of, default=None)
    hf_bf16 = results.get("hf-bf16-b8")
    reference = results.get("hf-b1") or best_hf  # top-1 labels of transformers float32
    header = ["configuration", "images", "seconds", "images/s", "x hf fp32 (best)", "x hf bf16 b8"]
    header += ["same top-1 as hf fp32", "peak RSS MB", "load s", "other CPU"]
    rows = []
    for name, r in results.items():
        rate = rate_of(r)
        x_hf = f"{rate / rate_of(best_hf):.2f}x" if best_hf else "-"
        x_hf_bf16 = f"{rate / rate_of(hf_bf16):.2f}x" if hf_bf16 else "-"
        same = "-"
        if reference is not None and "top1" in r and r is not reference:
            pairs = list(zip(r["top1"], reference["top1"]))
            same = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
        rss = f"{r['peak_rss_mb']:.0f}" if "peak_rss_mb" in r else "-"
        load = f"{r['load_s']:.1f}" if "load_s" in r else "-"
        rows.append([name, r["images"], f"{r['run_s']:.1f}", f"{rate:.2f}", x_hf, x_hf_bf16, same, rss, load])
        rows[-1].append(f"{100 * r['other_cpu']:.0f}%")
    lines = [machine(args.threads, peers=("transformers", "PIL", "ray")), *markdown_table(header, rows)]
    breakdown = [(n, r["breakdown_ms"]) for n, r in results.items() if "breakdown_ms" in r]
    if breakdown:
        lines += ["", f"Where the time goes, ms per image over the first {BREAKDOWN} images:"]
        lines += markdown_table(
            ["configuration", "decode", "resize", "model", "decode + resize share"],
            [
                [
                    n,
                    *(f"{b[k]:.1f}" for k in ("decode", "resize", "model")),
                    f"{(b['decode'] + b['resize']) / sum(b.values()):.0%}",
                ]
                for n, b in breakdown
            ],
        )
    for name, r in results.items():
        if name not in RAY:
            continue
        ours = results.get("ours-" + name.rsplit("-", 1)[1])
        lines.append(f"{name}: workers {r['workers']}; stage busy s {r['stage_busy_s']}; errors {r['errors']}")
        lines.append(f"{name}: submit to end {r['wall_s']:.1f} s; machine busy CPU-s {r['machine_busy_cpu_s']:.0f}")
        if ours is not None:
            in_process = ours["images"] / (ours["run_s"] + ours["load_s"])
            ratio = (r["images"] / r["run_s"]) / in_process
            lines.append(f"{name} / in process (load + run): {ratio:.2f}x; target >= 0.8x")
    return lines


if __name__ == "__main__":
    main()
