import pytest

from fusedit.dist.env import destroy_distributed, init_distributed

from .workers import free_port


@pytest.fixture
def group(monkeypatch):
    """A one-process gloo process group in the test process (torchrun's variables set), destroyed afterwards."""
    for name, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                            MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(name, value)
    env = init_distributed("cpu")
    yield env
    destroy_distributed()
