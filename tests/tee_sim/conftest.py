import pytest

from tee_sim import Context


@pytest.fixture
def home(tmp_path):
    return tmp_path / "device"


@pytest.fixture(scope="module")
def process_context(tmp_path_factory):
    """One secure-world process shared by a test module (starting an interpreter costs ~0.5 s)."""
    context = Context("process", home=tmp_path_factory.mktemp("device"), timeout=10.0)
    yield context
    context.close()


@pytest.fixture(params=["inprocess", "process"])
def context(request, tmp_path):
    """A context on each transport."""
    if request.param == "process":
        ctx = request.getfixturevalue("process_context")
        if ctx.closed:
            pytest.skip("module context closed")
        yield ctx
    else:
        ctx = Context("inprocess", home=tmp_path / "device")
        yield ctx
        ctx.close()
