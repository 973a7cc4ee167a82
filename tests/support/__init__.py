"""Test helpers shared by the test suite (servers and fixtures that are not tests themselves)."""

from tests.support.fake_openai import FakeOpenAI

__all__ = ["FakeOpenAI"]
