import os

# Tests never reach the network: a hub id must resolve from the local cache or fail clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from helpers.tiny_models import make_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A float32 transformers-saved tiny Mixtral, shared read-only by tests."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("tiny_mixtral"))
