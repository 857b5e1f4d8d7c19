"""Finding the reference QEMU tools: skip locally without them, fail in CI."""
import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """Path of a QEMU tool; a missing tool fails the test when CI=true, else skips it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (install qemu-utils / qemu-system-common)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
