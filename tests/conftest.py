"""Test-wide set-up and shared fixtures.

The ``alaya`` CLI's caches (compiled programs, parsed weights) go to a temporary directory
of this test session, never to the user's cache or the project tree. Helpers shared by
several test files live in ``tests/support/``; no test module imports another.
"""

import os

import pytest

from tests.support.engines import tiny_engine


@pytest.fixture(scope="session", autouse=True)
def _alaya_cache_dir(tmp_path_factory):
    old = os.environ.get("ALAYA_CACHE_DIR")
    os.environ["ALAYA_CACHE_DIR"] = str(tmp_path_factory.mktemp("alaya-cache"))
    yield
    if old is None:
        os.environ.pop("ALAYA_CACHE_DIR", None)
    else:
        os.environ["ALAYA_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def engine():
    """A tiny random-weight engine (``tests.support.engines.tiny_engine``), one per test module."""
    return tiny_engine()
