"""Test-wide set-up: the ``alaya`` CLI's caches (compiled programs, parsed weights) go to a
temporary directory of this test session, never to the user's cache or the project tree."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _alaya_cache_dir(tmp_path_factory):
    old = os.environ.get("ALAYA_CACHE_DIR")
    os.environ["ALAYA_CACHE_DIR"] = str(tmp_path_factory.mktemp("alaya-cache"))
    yield
    if old is None:
        os.environ.pop("ALAYA_CACHE_DIR", None)
    else:
        os.environ["ALAYA_CACHE_DIR"] = old
