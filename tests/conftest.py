"""Shared test switches: skip what this machine cannot run, with the reason."""

from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    is_root = os.geteuid() == 0
    has_ip = shutil.which("ip") is not None
    skip_netns = pytest.mark.skip(reason="needs root and iproute2 for private network namespaces")
    for item in items:
        if "netns" in item.keywords and not (is_root and has_ip):
            item.add_marker(skip_netns)
