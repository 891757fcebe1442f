import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one thread: on a small shared box two threads mostly wait for each other (and for other
    jobs), which made the generation tests several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
