"""Runtime tests start real `serve` processes; none may outlive its test (a failed assertion
would otherwise leave it scoring, and slowing every later test, until the machine stops)."""

import pytest

from tests.runtime.serve_proc import RUNNING


@pytest.fixture(autouse=True)
def no_serve_left_behind():
    yield
    while RUNNING:
        serve = RUNNING.pop()
        if serve.proc.poll() is None:
            serve.kill()
