"""Sampling settings that would reach the sampler as inf or NaN: one clear message from every
command that samples, never a traceback (the settings are checked in SamplingSettings alone)."""

from __future__ import annotations

import pytest
from reliability_helpers import cli

BAD = [
    (["--temperature", "1e-300"], "temperature"),
    (["--top-p", "0"], "top_p"),
    (["--temperature", "nan"], "temperature"),
]


@pytest.mark.parametrize("flags, name", BAD)
def test_generate_refuses_bad_sampling_settings_in_one_line(trained, flags, name):
    rc, err = cli(["generate", "--model", str(trained), "a", "--max-new-tokens", "2", *flags])
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("tegaki generate: error:") and name in err and err.count("\n") == 1


@pytest.mark.parametrize("flags, name", BAD)
def test_chat_refuses_bad_sampling_settings_in_one_line(trained, flags, name):
    rc, err = cli(["chat", "--model", str(trained), *flags])
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("tegaki chat: error:") and name in err


def test_generate_samples_with_a_tiny_top_p(trained):
    """top_p 1e-300 is a real setting (keep only the best token), not an error."""
    rc, err = cli(["generate", "--model", str(trained), "a", "--max-new-tokens", "3", "--top-p", "1e-300"])
    assert rc == 0, err


def test_generate_refuses_a_tiny_repetition_penalty(trained):
    rc, err = cli(["generate", "--model", str(trained), "a", "--repetition-penalty", "1e-308"])
    assert rc == 2 and "repetition_penalty" in err and "Traceback" not in err
