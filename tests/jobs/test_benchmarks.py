"""jobs/benchmarks/: kept out of the runtime code and the installed package, runnable (imports, --help), the
shared harness's selection / table / repeat logic, the corpus generator behind the bundled sample, and the
documented `python -m jobs...` commands naming modules that exist. No benchmark is timed here."""

import ast
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
import tomllib

from jobs.benchmarks import corpus, harness

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ("chat", "embeddings", "generation", "images", "ray_job", "serve", "tasks")
PYTHON_M = re.compile(r"\bpython3?\s+-m\s+(jobs(?:\.\w+)+)\b(?!\.<)")  # not a placeholder: jobs.benchmarks.<name>


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.update([node.module, *(f"{node.module}.{alias.name}" for alias in node.names)])
    return names


def test_runtime_code_does_not_import_the_benchmarks():
    """pipelines/, deploy/, cluster/ and the job entry points never import jobs.benchmarks: it is not installed."""
    runtime = [*ROOT.glob("pipelines/**/*.py"), *ROOT.glob("deploy/**/*.py"), *ROOT.glob("cluster/**/*.py")]
    runtime += [p for p in (ROOT / "jobs").glob("*.py")]
    assert len(runtime) > 20 and ROOT / "jobs" / "infer.py" in runtime
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in _imported_modules(p) if m.startswith("jobs.benchmarks"))
        for p in runtime
    }
    assert not {path: mods for path, mods in offenders.items() if mods}


def test_the_installed_package_leaves_the_benchmarks_out():
    """pyproject's package find: the runtime packages are in, jobs.benchmarks (run from a checkout) is not."""
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    packages = set(setuptools.find_packages(str(ROOT), include=find["include"], exclude=find.get("exclude", ())))
    assert {"pipelines", "jobs", "deploy", "cluster"} <= packages
    assert not {p for p in packages if p.startswith("jobs.benchmarks")}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_imports_and_parses_help(name, capsys):
    """Each benchmark module imports from the checkout and its command line answers --help (a broken import
    or argument table after a move shows here, without running the benchmark)."""
    module = importlib.import_module(f"jobs.benchmarks.{name}")
    with pytest.raises(SystemExit) as exit:
        module.main(["--help"])
    assert exit.value.code == 0
    assert f"python -m jobs.benchmarks.{name}" in module.__doc__
    assert "usage:" in capsys.readouterr().out


def test_the_tasks_benchmark_imports_only_the_standard_library_at_the_top():
    """jobs.benchmarks.tasks runs its QA reference children under another interpreter (transformers 4.57):
    importing it, with the harness, must not pull in torch, numpy, transformers or our pipelines."""
    code = (
        "import sys, jobs.benchmarks.tasks; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'transformers', 'pipelines'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_select_configs_names_prefixes_optional_and_unknown():
    """--only: exact names in the order given, prefixes expanding to their family, optional names only when
    named exactly, `accept` for names outside the table; an unknown name fails listing the known ones."""
    known = ["ours", "hf-b1", "hf-b8", "hf-b32"]
    assert harness.select_configs(None, known, optional=["hf-b32"]) == ["ours", "hf-b1", "hf-b8"]
    assert harness.select_configs("hf,ours", known, optional=["hf-b32"]) == ["hf-b1", "hf-b8", "ours"]
    assert harness.select_configs("hf-b32,hf-b1,hf-b1", known, optional=["hf-b32"]) == ["hf-b32", "hf-b1"]
    assert harness.select_configs("hf-b64", known, accept=lambda n: n == "hf-b64") == ["hf-b64"]
    with pytest.raises(SystemExit, match=r"unknown configuration 'hf-b64'; known: ours, hf-b1, hf-b8, hf-b32 \(hint\)"):
        harness.select_configs("hf-b64", known, hint=" (hint)")


def test_markdown_table_lines():
    """Header, separator and one line per row, cells as str: the table format BENCHMARKS.md holds."""
    assert harness.markdown_table(["a", "b c"], [[1, "x"], [2.5, ""]]) == [
        "| a | b c |",
        "|---|---|",
        "| 1 | x |",
        "| 2.5 |  |",
    ]


def test_best_of_repeats_within_the_budget_and_resets_before_each_run():
    """Without a budget every repeat runs (best = the fastest); a budget of 0 s stops after the first run; the
    before_each hook runs before every timed run and the result is the last run's."""
    calls, resets = [], []
    unlimited = harness.best_of(lambda: calls.append(1) or len(calls), 3, float("inf"), lambda: resets.append(1))
    assert (len(unlimited.runs_s), len(unlimited.other_cpu), unlimited.result, len(resets)) == (3, 3, 3, 3)
    assert unlimited.runs_s[unlimited.best] == min(unlimited.runs_s)
    assert all(0.0 <= share for share in unlimited.other_cpu)
    once = harness.best_of(lambda: "done", 5, 0.0)
    assert (len(once.runs_s), once.result, once.best) == (1, "done", 0)


def test_the_bundled_sample_is_the_corpus_generators_output(tmp_path):
    """jobs/data/sample_corpus.jsonl is what `python -m jobs.benchmarks.corpus --rows 10000` writes (seed 0),
    byte for byte: the generator the benchmarks' workloads come from has not drifted from the sample."""
    corpus.main(["--rows", "10000", "--out", str(tmp_path / "sample.jsonl")])
    bundled = (ROOT / "jobs" / "data" / "sample_corpus.jsonl").read_bytes()
    assert (tmp_path / "sample.jsonl").read_bytes() == bundled
    first = json.loads(bundled.splitlines()[0])
    assert first == {"id": 0, "text": corpus.make_corpus(1, seed=0)[0]}


def test_documented_jobs_commands_name_modules_that_exist():
    """Every `python -m jobs....` in the repository's markdown and in the jobs/ docstrings names a module file:
    a renamed benchmark or job leaves no stale command behind (BENCHMARKS.md's reproduce the figures)."""
    texts = [p for p in ROOT.rglob("*.md") if not {".venv", ".git", "node_modules"} & set(p.parts)]
    texts += list((ROOT / "jobs").rglob("*.py"))
    modules = {m.rstrip(".") for p in texts for m in PYTHON_M.findall(p.read_text(encoding="utf-8"))}
    assert {"jobs.infer", "jobs.embed", "jobs.benchmarks.embeddings", "jobs.benchmarks.tasks"} <= modules
    missing = sorted(m for m in modules if not (ROOT / (m.replace(".", "/") + ".py")).is_file())
    assert not missing, f"documented but no such module: {missing}"


def test_the_chat_benchmark_runs_end_to_end_on_two_tiny_chats(tmp_path, smollm2_path, monkeypatch):
    """jobs.benchmarks.chat on the real SmolLM2 file, 2 chats of 4 forced new tokens, without the greedy sanity
    (no transformers model loaded): the sanity children find the same prompt ids on every side, ours-fp32 and
    llama-cpp (its child under the llama-cpp-python venv, which has no torch) each generate exactly the forced
    tokens with a first-token time inside the run, and --json holds the summary. Where that venv is absent the
    llama-cpp row is a skip note instead. (Timings are not checked: a disturbed child is not run again here.)"""
    from jobs.benchmarks import chat

    monkeypatch.setattr(harness, "DISTURBED", 2.0)  # other processes' CPU share never reaches it

    out = tmp_path / "chat.json"
    argv = ["--prompts", "2", "--new-tokens", "4", "--sanity-prompts", "0", "--only", "ours-fp32,llama-cpp"]
    summary = chat.main([*argv, "--wait-idle", "0", "--model", str(smollm2_path), "--json", str(out)])
    assert json.loads(out.read_text()) == summary
    assert summary["generated_tokens"] == 8 and summary["sanity"]["ok"] and summary["sanity"]["same_prompt_ids"] == 2
    has_llama = Path(chat.LLAMA_PYTHON).is_file()
    assert [r["name"] for r in summary["results"]] == ["ours-fp32", "llama-cpp"][: 1 + has_llama]
    for r in summary["results"]:
        assert (r["prompts"], r["tokens"], len(r["ttft_s"])) == (2, 8, 2), r
        assert all(0 < t <= r["run_s"] for t in r["ttft_s"]), r
    if has_llama:
        assert summary["sanity"]["llama"]["same_prompt_ids"] == 2
    else:
        assert any("llama-cpp skipped" in note for note in summary["notes"])
