"""`gguf.reader.scan_gguf` (the fast header scan quantize reports from) reads what gguf.GGUFReader reads:
every scalar and string key, the length of every array, the whole tensor table."""

from __future__ import annotations

import pytest

from cllama_deploy.errors import InputError
from cllama_deploy.gguf.reader import ArraySummary, field_value, open_gguf, scan_gguf, weight_totals


def _same_as_gguf_reader(path):
    reader, header = open_gguf(path), scan_gguf(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(header.fields) == list(fields)
    for key, f in fields.items():
        got = header.fields[key]
        if isinstance(got, ArraySummary):
            assert got.count == len(f.data), key
        else:
            assert got == pytest.approx(field_value(f)), key
    assert [(t.name, t.shape, t.tensor_type, t.offset, t.n_elements, t.n_bytes) for t in header.tensors] == [
        (t.name, tuple(int(x) for x in t.shape), t.tensor_type, int(t.data_offset) - reader.data_offset,
         int(t.n_elements), int(t.n_bytes)) for t in reader.tensors]
    assert weight_totals(header) == weight_totals(reader)


def test_scan_matches_gguf_reader(tiny_ggufs, q256_f16, tmp_path):
    from cllama_deploy.gguf.quantize import QuantizeConfig, quantize

    for by_type in tiny_ggufs.values():
        for path in by_type.values():
            _same_as_gguf_reader(path)
    q4 = quantize(QuantizeConfig(input=q256_f16, output=tmp_path / "q4.gguf", type="Q4_K_M", threads=1),
                  show_progress=False)
    _same_as_gguf_reader(q4.path)


def test_scan_of_a_truncated_file(q256_f16, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(q256_f16.read_bytes()[:2000])
    with pytest.raises(InputError, match=r"MODEL .*cut.gguf: unreadable GGUF header"):
        scan_gguf(cut)
