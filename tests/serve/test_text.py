"""Incremental detokenisation and stop sequences (btlm.serve.text)."""

from btlm.serve.text import IncrementalDecoder, StopMatcher


def test_incremental_decoder_rebuilds_text_with_split_characters(tokenizer):
    text = "Zürich — 東京 🚀 naïve café, ok"
    ids = tokenizer(text)["input_ids"]
    dec = IncrementalDecoder(tokenizer)
    deltas = [dec.push(t) for t in ids]
    assert all("\ufffd" not in d for d in deltas)  # a character split across byte-level tokens waits
    assert "".join(deltas) + dec.flush() == text
    assert any(d == "" for d in deltas)  # ... so some steps release nothing


def test_stop_matcher_cuts_at_first_stop_and_holds_partial_matches():
    m = StopMatcher(["END", "\n\n"])
    out = []
    for piece in ["hello E", "N", "x wor", "ld\n", "\nmore"]:
        text, stopped = m.feed(piece)
        out.append(text)
        if stopped:
            break
    assert out == ["hello ", "", "ENx wor", "ld", ""]  # "E"/"EN" held until they could not be "END"
    assert "".join(out) == "hello ENx world" and stopped


def test_stop_matcher_stop_spanning_deltas_and_flush():
    m = StopMatcher(["abc"])
    assert m.feed("xxa") == ("xx", False)
    assert m.feed("b") == ("", False)
    assert m.feed("c tail") == ("", True)
    m = StopMatcher(["abc"])
    assert m.feed("1ab") == ("1", False)
    assert m.flush() == "ab"  # generation ended (length): the held text is released
    assert StopMatcher([]).feed("abc") == ("abc", False)
