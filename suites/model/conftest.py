import pytest

pytest.importorskip("transformers", reason="the model suites compare against transformers (a test dependency)")
pytest.importorskip("safetensors")

from .checkpoints import VARIANTS, write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name) -> directory of that variant, written once per session."""
    cache = {}

    def get(name: str, sharded: bool = False):
        key = (name, sharded)
        if key not in cache:
            cache[key] = write_checkpoint(name, tmp_path_factory.mktemp(f"{name}{'-sharded' if sharded else ''}"), "20KB" if sharded else None)
        return cache[key]

    return get


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param
