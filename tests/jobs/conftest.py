import os

import pytest

from .helpers import Ctx

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items):
    """A hung job must fail its test (with thread stacks), not stall the suite."""
    for item in items:
        if str(item.fspath).startswith(_HERE) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(90, method="thread"))


@pytest.fixture
def ctx():
    c = Ctx()
    yield c
    c.close()
