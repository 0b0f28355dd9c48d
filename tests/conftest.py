"""Settings of the whole test suite."""

from __future__ import annotations

from hypothesis import settings

# Property tests draw the same examples on every run, so a run never fails by the luck of the draw.
# `pytest --hypothesis-profile explore` draws new and more examples, to look for new failures.
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", max_examples=2000)
settings.load_profile("repeatable")
