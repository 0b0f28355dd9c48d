"""Stop-string matching: streamed text is never retracted and never contains a stop string."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from loftey.orchestrator.stop_strings import StopStringMatcher


def stream(matcher: StopStringMatcher, deltas: list[str]) -> list[str]:
    """Feed the deltas until a match; return what the matcher let out, flushed at the end."""
    out = []
    for delta in deltas:
        out.append(matcher.feed(delta))
        if matcher.matched is not None:
            return out
    out.append(matcher.flush())
    return out


def reference_cut(text: str, stop: list[str]) -> tuple[str, str | None]:
    """Cut the text where the earliest stop string starts, the obvious way."""
    best = None
    for candidate in stop:
        start = text.find(candidate)
        if start != -1 and (best is None or start < best[0]):
            best = (start, candidate)
    if best is None:
        return text, None
    return text[: best[0]], best[1]


def reference_stream_cut(deltas: list[str], stop: list[str]) -> tuple[str, str | None]:
    """Cut where generation ends: after the first delta whose text so far contains a stop string."""
    text = ""
    for delta in deltas:
        text += delta
        cut, matched = reference_cut(text, stop)
        if matched is not None:
            return cut, matched
    return text, None


def test_stop_split_over_tokens():
    deltas = ["alpha", " beta", " gamma", " delta"]
    matcher = StopStringMatcher(["beta gamma"])

    out = stream(matcher, deltas)

    assert "".join(out) == "alpha "
    assert matcher.matched == "beta gamma"
    assert out == ["alpha", " ", ""]


def test_partial_stop_released_at_end():
    matcher = StopStringMatcher(["beta gamma"])
    assert matcher.feed("alpha beta") == "alpha "
    assert matcher.flush() == "beta"
    assert matcher.matched is None


def test_stop_at_text_start():
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.feed("\n") == ""
    assert matcher.feed("\nrest") == ""
    assert matcher.matched == "\n\n"


def test_earliest_stop_wins():
    matcher = StopStringMatcher(["abcd", "bc"])
    assert matcher.feed("abc") == "a"
    assert matcher.matched == "bc"


def test_completed_stop_wins_over_longer_one_still_open():
    # After " a", "a" is complete, so generation ends there, although " aa" would start earlier.
    matcher = StopStringMatcher(["a", " aa"])
    assert matcher.feed(" a") == " "
    assert matcher.matched == "a"


def test_no_stop_strings_pass_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == "anything"
    assert matcher.flush() == ""


@given(
    text=st.text(alphabet="ab c", max_size=30),
    stop=st.lists(st.text(alphabet="ab c", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=10),
)
def test_matches_reference_for_any_split(text: str, stop: list[str], cuts: list[int]):
    bounds = sorted({0, len(text), *(cut for cut in cuts if cut <= len(text))})
    deltas = [text[start:end] for start, end in zip(bounds, bounds[1:])]
    expected_text, expected_stop = reference_stream_cut(deltas, stop)

    out = stream(StopStringMatcher(stop), deltas)

    streamed = ""
    for piece in out:
        streamed += piece
        # Text once streamed is final: a prefix of the expected output.
        assert expected_text.startswith(streamed)
    assert streamed == expected_text
    if expected_stop is not None:
        assert expected_stop not in streamed
