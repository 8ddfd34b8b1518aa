import pytest

pytest.importorskip("transformers", reason="the model suites compare against transformers (a test dependency)")
pytest.importorskip("safetensors")

from .checkpoints import VARIANTS  # noqa: E402
from .hf_tp_rank_fns import UNSHARDED_SPEC  # noqa: E402
from .protocol_rank_fns import MISSHAPED_SPEC, SKEWED_SPEC  # noqa: E402


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return request.param


SIDE_BY_SIDE = ("reference", "hf-tp", "dtensor", UNSHARDED_SPEC, SKEWED_SPEC, MISSHAPED_SPEC)


@pytest.fixture(scope="session")
def side_by_side(checkpoint, worlds):
    """One `verify` of llama-gqa (2 kv heads, vocabulary 101) at TP 1, 2, 4 of SIDE_BY_SIDE, as
    `tpgate verify --impl` runs them (one set of references for all): tpgate's stack, the two
    built-in peers, a stack that loads the whole model on every rank, one with skewed logits and
    one returning misshaped logits. -> (result, {(implementation, tp): row}, full parameter count)."""
    from harness.verify import VerifyRequest, full_parameter_count, verify
    from impl.model_loader import read_config

    directory = str(checkpoint("llama-gqa"))
    result = verify(VerifyRequest(directory, (1, 2, 4), new_tokens=3, implementations=SIDE_BY_SIDE), lambda n: worlds[n])
    return result, {(r["implementation"], r["tp"]): r for r in result["rows"]}, full_parameter_count(read_config(directory))
