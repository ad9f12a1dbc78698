"""One home for GGUF knowledge: keys (on gguf.Keys), file types, reading (magic check, field decoding,
bits per weight), and the thread default."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import cllama_deploy
from cllama_deploy.errors import ConfigError, InputError
from cllama_deploy.gguf import keys

PACKAGE = Path(cllama_deploy.__file__).parent


def _gguf_key_templates() -> set[str]:
    """Every key gguf.Keys declares, placeholders ("{arch}", "{id}") made "{}"."""
    import gguf

    out: set[str] = set()

    def walk(cls) -> None:
        for value in vars(cls).values():
            if isinstance(value, str):
                out.add(re.sub(r"\{[a-z_]*\}", "{}", value))
            elif isinstance(value, type):
                walk(value)

    walk(gguf.Keys)
    return out


def _is_key(text: str, templates: set[str]) -> bool:
    norm = re.sub(r"\{[a-z_]*\}", "{}", text)
    return (norm in templates or norm.replace("llama.", "{}.", 1) in templates
            or norm.startswith(("tokenizer.ggml.", "general.", "{}.rope.", "{}.attention.")))


def _key_literals() -> dict[str, list[str]]:
    templates = _gguf_key_templates()
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            elif isinstance(node, ast.JoinedStr):  # f"{ARCH}.block_count", f"tokenizer.ggml.{kind}_token_id"
                text = "".join(v.value if isinstance(v, ast.Constant) else "{x}" for v in node.values)
            else:
                continue
            if " " not in text and _is_key(text, templates):
                found.setdefault(str(path.relative_to(PACKAGE.parent)), []).append(text)
    return found


def test_gguf_key_strings_live_in_one_module():
    found = _key_literals()
    found.pop("cllama_deploy/gguf/keys.py", None)
    assert not found, f"GGUF keys spelled outside cllama_deploy/gguf/keys.py: {found}"


def test_keys_are_gguf_s_own():
    import gguf

    assert keys.CHAT_TEMPLATE == gguf.Keys.Tokenizer.CHAT_TEMPLATE == "tokenizer.chat_template"
    assert keys.BLOCK_COUNT == "llama.block_count"
    assert keys.SPECIAL_ID_KEYS["sep"] == "tokenizer.ggml.seperator_token_id"  # llama.cpp's spelling
    # only kinds gguf.GGUFWriter can write (gguf.SpecialVocab skips the others, e.g. cls)
    for kind in keys.SPECIAL_ID_KEYS:
        assert hasattr(gguf.GGUFWriter, f"add_{kind}_token_id")
    assert keys.QUANT_VERSION == 2


def test_file_types_agree_with_the_installed_llama_cpp():
    """One table of llama_ftype numbers: the converter's types and every quantize type match llama.cpp."""
    import llama_cpp

    from cllama_deploy.gguf.convert import OUTTYPES
    from cllama_deploy.gguf.quantize import QUANT_TYPES, ftype_of

    for name, (const, _, _) in QUANT_TYPES.items():
        assert keys.file_type(name) == getattr(llama_cpp, const) == ftype_of(name), name
        assert keys.file_type_name(keys.file_type(name)) == name
    assert {t: keys.file_type(q) for t, q in OUTTYPES.items()} == {"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7}
    assert keys.file_type_name(12345) is None
    with pytest.raises(KeyError):
        keys.file_type("Q9_Z")


def test_reader_refuses_what_is_not_a_gguf(tmp_path):
    from cllama_deploy.gguf.reader import check_gguf_file, is_gguf, open_gguf

    text = tmp_path / "config.json"
    text.write_text("{}")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF\x03\x00")
    assert not is_gguf(text) and is_gguf(truncated) and not is_gguf(tmp_path / "missing")
    with pytest.raises(InputError, match=r"^IN .*config.json: not a GGUF file .*cllama-deploy convert"):
        check_gguf_file(text, "IN")
    with pytest.raises(InputError, match="no such file"):
        open_gguf(tmp_path / "missing.gguf")
    with pytest.raises(InputError, match="unreadable GGUF"):
        open_gguf(truncated)


def test_reader_decodes_fields_and_counts_bits_per_weight(tmp_path):
    import gguf
    import numpy as np

    from cllama_deploy.gguf.reader import file_type_of, get_field, open_gguf, read_fields, weight_totals

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), keys.ARCH)
    keys.write_rows(w, [(keys.NAME, "tiny 模型", "STRING"), (keys.FILE_TYPE, keys.file_type("F16"), "UINT32"),
                        (keys.TOKENS, ["a", "b", "é"], "ARRAY"), (keys.ADD_SPECIAL_KEYS["bos"], True, "BOOL"),
                        (keys.RMS_EPS, 1e-5, "FLOAT32")])
    w.add_tensor("a", np.zeros((4, 8), dtype=np.float16))
    w.add_tensor("b", np.zeros(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = open_gguf(path)
    fields = read_fields(r)
    assert not any(k.startswith("GGUF.") for k in fields)
    assert fields[keys.NAME] == "tiny 模型" and fields[keys.TOKENS] == ["a", "b", "é"]
    assert fields[keys.ADD_SPECIAL_KEYS["bos"]] is True and abs(fields[keys.RMS_EPS] - 1e-5) < 1e-12
    assert get_field(r, "no.such.key", 7) == 7 and file_type_of(r) == "F16"
    t = weight_totals(r)
    assert (t.n_params, t.n_bytes, t.type_counts) == (40, 32 * 2 + 8 * 4, {"F16": 1, "F32": 1})
    assert t.bits_per_weight == pytest.approx(8 * 96 / 40)


def test_one_thread_default_reads_the_environment_the_same_way(monkeypatch):
    from cllama_deploy.engine.threads import available_cpus, default_n_threads
    from cllama_deploy.gguf.quantize import default_threads

    monkeypatch.delenv("CLLAMA_N_THREADS", raising=False)
    assert default_n_threads() == max(1, available_cpus() // 2)
    assert default_threads() == default_n_threads("quantize") == available_cpus()
    monkeypatch.setenv("CLLAMA_N_THREADS", " 3 ")
    assert default_n_threads() == default_threads() == 3
    for bad in ("abc", "0", "-2", "1.5"):
        monkeypatch.setenv("CLLAMA_N_THREADS", bad)
        for f in (default_n_threads, default_threads):
            with pytest.raises(ConfigError, match="CLLAMA_N_THREADS"):
                f()
