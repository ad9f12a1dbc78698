"""UTF-8-safe incremental detokenization and stop strings (no model needed)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cllama_deploy.engine.detok import TextAssembler, decode_all


def run(pieces, stops=()):
    a = TextAssembler(stops)
    out = [a.push(p) for p in pieces]
    out.append(a.finish())
    return out, a


def test_character_split_over_byte_tokens_is_emitted_once_complete():
    # 中 = E4 B8 AD, 文 = E6 96 87: byte-fallback tokens, one byte each
    pieces = [b"\xe4", b"\xb8", b"\xad", b"\xe6", b"\x96", b"\x87", b"!"]
    out, _ = run(pieces)
    assert out == ["", "", "中", "", "", "文", "!", ""]
    assert "\ufffd" not in "".join(out)


def test_sentencepiece_tokens_of_the_fixture_tokenizer_split_chinese(server_sp_model):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(server_sp_model))
    text = "龘靐齉 mixed 中文 text 😀"
    ids = sp.encode(text)
    pieces = []
    for i in ids:
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            pieces.append(bytes([int(piece[3:5], 16)]))
        else:
            pieces.append(piece.replace("\u2581", " ").encode("utf-8"))
    assert any(sp.is_byte(i) for i in ids), "the test needs characters that fall back to bytes"
    out, _ = run(pieces)
    assert all("\ufffd" not in chunk for chunk in out)
    assert "".join(out) == decode_all(pieces) == " " + text


def test_invalid_bytes_are_replaced_exactly_as_in_the_whole_text():
    pieces = [b"a\xe4", b"\xb8", b"b", b"\xff", b"\xf0\x9f", b"\x98"]  # truncated sequences, bad byte
    out, _ = run(pieces)
    assert "".join(out) == decode_all(pieces) == b"".join(pieces).decode("utf-8", "replace")


def test_stop_string_across_tokens_is_cut_and_never_partly_emitted():
    pieces = [b"Hello", b" ###", b" Inst", b"ruction:", b" more"]
    out, a = run(pieces, ["### Instruction:"])
    assert "".join(out) == "Hello "
    assert a.stopped and a.stop_string == "### Instruction:"
    assert all("#" not in chunk for chunk in out)


def test_held_prefix_that_is_not_a_stop_is_released():
    out, a = run([b"ab", b"#", b"#x"], ["###"])
    assert not a.stopped
    assert out == ["ab", "", "##x", ""]


def test_stop_inside_a_multibyte_character_sequence():
    out, a = run([b"\xe4\xb8", b"\xad\xe6\x96\x87", b"x"], ["文"])
    assert "".join(out) == "中" and a.stopped


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=24), cuts=st.lists(st.integers(1, 4), max_size=24),
       stops=st.lists(st.sampled_from(["\ufffd", "中", "ab", "\n\n", "x\ufffdy"]), max_size=2))
def test_streamed_text_equals_non_streamed_text(data, cuts, stops):
    pieces, i = [], 0
    for c in cuts:
        if i >= len(data):
            break
        pieces.append(data[i:i + c])
        i += c
    if i < len(data):
        pieces.append(data[i:])
    out, a = run(pieces, stops)
    whole = decode_all(pieces)
    found = [whole.find(s) for s in stops if s in whole]
    expected = whole[:min(found)] if found else whole
    assert "".join(out) == expected
    for chunk in out:  # no chunk ends inside a character that later completes
        assert chunk == "" or not (0xD800 <= ord(chunk[-1]) <= 0xDFFF)
