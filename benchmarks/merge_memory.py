"""Peak memory of the streaming merge versus the model size (and, optionally, versus PEFT's merge).

Builds a random LLaMA (default: 8 layers, hidden 1024, vocab 32000, f32) and the seed's "Plus" pair of
adapters: a pre-training LoRA that grows the vocabulary to 49953 (embed_tokens/lm_head saved whole,
LoRA r=8 on every projection) and an SFT LoRA (49954 tokens, the same kinds of tensors). Files are
written with numpy only. Then runs, each in a fresh subprocess whose own peak RSS (VmHWM) is recorded:

* ``idle``: Python importing cllama_deploy.merge and numpy, nothing else (the floor);
* ``ours``: ``cllama-deploy merge`` (the ``merge()`` function) into a temporary directory;
* ``peft`` (with ``--peft``): the seed's path: transformers load, resize, PeftModel.from_pretrained,
  merge_and_unload per adapter, save_pretrained.

    python benchmarks/merge_memory.py [--layers 8 --hidden 1024 --vocab 32000] [--peft] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cllama_deploy.checkpoint.safetensors_io import ShardWriter  # noqa: E402

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def layer_shapes(i, hidden, inter, kv_dim):
    p = f"model.layers.{i}."
    return {p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv_dim, hidden),
            p + "self_attn.v_proj.weight": (kv_dim, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter)}


def write_file(path: Path, shapes: dict, rng, scale=0.02):
    with open(path, "wb") as fh:
        w = ShardWriter(fh, list(shapes.items()), "float32")
        for name, shape in shapes.items():
            w.write(name, (rng.standard_normal(shape, dtype=np.float32) * scale))
        w.close()


def build(root: Path, layers: int, hidden: int, inter: int, heads: int, kv_heads: int, vocab: int):
    rng = np.random.default_rng(0)
    kv_dim = hidden // heads * kv_heads
    base = root / "base"
    base.mkdir(parents=True)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update(layer_shapes(i, hidden, inter, kv_dim))
    shapes.update({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})
    write_file(base / "model.safetensors", shapes, rng)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
              "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    (base / "config.json").write_text(json.dumps(config))
    adapters = []
    for name, rows in (("pt", 49953), ("sft", 49954)):
        d = root / name
        d.mkdir()
        ashapes = {"base_model.model.model.embed_tokens.weight": (rows, hidden),
                   "base_model.model.lm_head.weight": (rows, hidden)}
        for i in range(layers):
            for full, shape in layer_shapes(i, hidden, inter, kv_dim).items():
                if len(shape) == 2:
                    module = "base_model.model." + full[: -len(".weight")]
                    ashapes[module + ".lora_A.weight"] = (8, shape[1])
                    ashapes[module + ".lora_B.weight"] = (shape[0], 8)
        write_file(d / "adapter_model.safetensors", ashapes, rng)
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "lora_dropout": 0.05,
            "target_modules": PROJ, "modules_to_save": ["embed_tokens", "lm_head"], "bias": "none",
            "fan_in_fan_out": False, "inference_mode": True}))
        adapters.append(d)
    return base, adapters, sum(int(np.prod(s)) * 4 for s in shapes.values())


_HWM = ("\nimport sys\nfor _l in open('/proc/self/status'):\n    if _l.startswith('VmHWM:'):\n"
        "        print('VMHWM', int(_l.split()[1]) * 1024, file=sys.stderr)\n")


def run_child(code: str) -> tuple[int, float]:
    """Run ``code`` in a fresh Python; return its peak RSS in bytes (VmHWM of the new process image:
    ru_maxrss would include this parent's pages from before the exec) and its wall time."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code + _HWM], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    hwm = [int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("VMHWM ")]
    return hwm[-1], time.perf_counter() - t0


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--peft", action="store_true", help="also run the seed's PEFT merge_and_unload path")
    ap.add_argument("--keep", type=Path, help="build into this directory and keep it")
    args = ap.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="merge_mem_"))
    try:
        t0 = time.perf_counter()
        base, adapters, base_bytes = build(root, args.layers, args.hidden, args.intermediate, args.heads,
                                           args.kv_heads, args.vocab)
        print(f"built base {base_bytes / 2**20:.0f} MiB + adapters "
              f"{sum(dir_size(a) for a in adapters) / 2**20:.0f} MiB in {time.perf_counter() - t0:.0f}s", flush=True)
        loras = [str(a) for a in adapters]
        idle, _ = run_child("import numpy, cllama_deploy.merge")
        ours, t_ours = run_child(
            "from cllama_deploy.merge import MergeConfig, merge\n"
            f"merge(MergeConfig(base={str(base)!r}, loras={loras!r}, out={str(root / 'out')!r}, "
            "check_tokenizer=False, show_progress=False))")
        merged_bytes = dir_size(root / "out")
        largest = 49954 * args.hidden * 4
        rows = [("idle (imports only)", idle, None), ("ours: merge()", ours, t_ours)]
        if args.peft:
            peft, t_peft = run_child(
                "import torch\nfrom transformers import AutoModelForCausalLM\nfrom peft import PeftModel\n"
                f"m = AutoModelForCausalLM.from_pretrained({str(base)!r}, dtype=torch.float32)\n"
                f"for d, n in (({loras[0]!r}, 49953), ({loras[1]!r}, 49954)):\n"
                "    m.resize_token_embeddings(n, mean_resizing=False)\n"
                "    m = PeftModel.from_pretrained(m, d).merge_and_unload()\n"
                f"m.save_pretrained({str(root / 'out_peft')!r})")
            rows.append(("seed: peft merge_and_unload + save_pretrained", peft, t_peft))
        print(f"\nmerged model {merged_bytes / 2**20:.0f} MiB (f32); largest tensor {largest / 2**20:.0f} MiB")
        print(f"{'run':48} {'peak RSS MiB':>12} {'x model':>8} {'wall s':>7}")
        for name, rss, wall in rows:
            print(f"{name:48} {rss / 2**20:12.0f} {rss / merged_bytes:8.2f} "
                  f"{'' if wall is None else f'{wall:7.1f}'}")
        print(f"ours above idle: {(ours - idle) / 2**20:.0f} MiB = {(ours - idle) / largest:.1f}x the largest tensor")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
