"""Benchmark: `cllama-deploy deploy --quant Q4_K_M` versus the seed's path, on one random model of
TinyLlama-1.1B shape with the 49953-token Chinese-LLaMA vocabulary.

Seed's path (Chinese-LLaMA-Alpaca's recipe):
  1. merge:    transformers + peft: from_pretrained(f16) → PeftModel → merge_and_unload → save_pretrained
  2. convert:  llama.cpp's convert_hf_to_gguf.py (from the llama-cpp-python sdist) → f16 GGUF
  3. quantize: llama_cpp.llama_model_quantize → Q4_K_M
Ours: one `cllama-deploy deploy` process (streaming merge → f16 GGUF → llama.cpp quantize).

Every step runs as its own process, started by this (small) process; the set-up runs in a process of
its own too. Peak memory of a step is the step's process's own high-water mark (``VmHWM`` from
/proc/self/status, written by the process itself as it exits: the script wraps every command with
``--wrap-hwm``). The parent's view of a child, ``ru_maxrss`` from wait4, is NOT used: a forked child's
counter starts from the parent's resident size, so a parent that had built the model reported its own
1.19 GB for every child. A psutil sampler of the process tree is kept as a cross-check. Ours' per-step
figures come from its manifest (wall time, and the kernel's high-water mark reset at each step).
Sides alternate (ours, seed, ours, ...) for ``--rounds``; the load average before each step is
recorded, so a noisy run shows itself. Prints a table and ratios, and writes JSON (``--json``).

    .venv/bin/python benchmarks/deploy_vs_seed.py --work /tmp/deploy-bench --rounds 2 [--threads 2] [--sdist DIR]

Set-up (not timed): the tokenizer (LLaMA's 32000 pieces + chinese_sp.model = 49953, from
/work/shared/data), a random f16 base (22 layers, hidden 2048, intermediate 5632, 32 heads, 4 KV heads)
written shard by shard with numpy, and a random LoRA (r 8, all 7 projections, embed_tokens/lm_head
saved through modules_to_save). The llama-cpp-python sdist (for convert_hf_to_gguf.py) is taken from
``--sdist``, else ~/.cache/cllama-bench, else downloaded with pip.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = Path("/work/shared/data")

SHAPES = {
    "tinyllama": dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=49953),
    # a smoke test of the script itself (seconds, not minutes); not a benchmark
    "smoke": dict(num_hidden_layers=2, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49953),
}
SHAPE = dict(SHAPES["tinyllama"])
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- setup ---------------------------------------------------------------------------------------------

def make_tokenizer(out: Path) -> Path:
    from cllama_deploy.tokenizer.merge import merge_models
    from cllama_deploy.tokenizer.spm import load_model

    merged, _, _, _ = merge_models(load_model(DATA / "llama-tokenizer" / "tokenizer.model"),
                                   load_model(DATA / "chinese_sp.model"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(merged.SerializeToString())
    return out


def _shapes() -> dict[str, tuple[int, ...]]:
    h, i, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["vocab_size"]
    kv = h // SHAPE["num_attention_heads"] * SHAPE["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(SHAPE["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i),
        })
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def _rand(rng, shape, std=0.02):
    import numpy as np

    if len(shape) == 1:
        return np.ones(shape, dtype=np.float16)
    return (rng.standard_normal(shape, dtype=np.float32) * std).astype(np.float16)


def make_base(out: Path, tokenizer: Path, shard_bytes: int = 1 << 30) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = _shapes()
    shards: list[list[str]] = [[]]
    used = 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        if shards[-1] and used + n > shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += n
    weight_map = {}
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: _rand(rng, shapes[name]) for name in names}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in names})
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                 "weight_map": weight_map}, indent=1))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16",
              "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False, **SHAPE}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return out


def make_lora(out: Path, tokenizer: Path, r: int = 8) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    shapes = _shapes()
    tensors = {}
    for name, shape in shapes.items():
        module = name.rsplit(".", 2)[-2]
        if module in TARGETS:
            stem = "base_model.model." + name[: -len(".weight")]
            tensors[stem + ".lora_A.weight"] = (rng.standard_normal((r, shape[1]), dtype=np.float32) * 0.02)
            tensors[stem + ".lora_B.weight"] = (rng.standard_normal((shape[0], r), dtype=np.float32) * 0.02)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors["base_model.model." + name] = _rand(rng, shapes[name])
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 32, "lora_dropout": 0.05,
           "target_modules": TARGETS, "modules_to_save": ["embed_tokens", "lm_head"], "bias": "none",
           "fan_in_fan_out": False, "inference_mode": True, "base_model_name_or_path": "base"}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    return out


# -- measuring -----------------------------------------------------------------------------------------

def wrap_hwm(argv: list[str]) -> None:
    """``--wrap-hwm FILE (-m MODULE | -c CODE | SCRIPT) ARGS...``: run a Python command in this process and,
    as it exits, write its own peak resident memory (VmHWM) to FILE. Runs before any heavy import here."""
    import atexit
    import runpy

    out, rest = Path(argv[0]), argv[1:]

    def write() -> None:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out.write_text(str(int(line.split()[1]) * 1024))

    atexit.register(write)
    if rest[0] == "-m":
        sys.argv = [rest[1]] + rest[2:]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
    elif rest[0] == "-c":
        sys.argv = ["-c"] + rest[2:]
        exec(compile(rest[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = rest
        sys.path.insert(0, str(Path(rest[0]).resolve().parent))
        runpy.run_path(rest[0], run_name="__main__")


def run_step(name: str, args: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``python ARGS`` through :func:`wrap_hwm`; wall time, the process's own peak RSS (VmHWM), a psutil
    sampler of its process tree (cross-check), the load average before it started."""
    import psutil

    hwm_file = log.with_suffix(".hwm")
    hwm_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--wrap-hwm", str(hwm_file), *args]
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')}] {name} (load {load:.1f}): {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    sampled = [0]
    done = threading.Event()

    def sample() -> None:
        try:
            ps = psutil.Process(proc.pid)
        except psutil.Error:
            return
        while not done.is_set():
            try:
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                sampled[0] = max(sampled[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    proc.wait()
    seconds = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        tail = log.read_bytes()[-3000:].decode("utf-8", "replace")
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{tail}")
    peak = int(hwm_file.read_text())
    print(f"    {seconds:.1f}s, peak RSS {peak / 2**30:.2f} GiB (sampled {sampled[0] / 2**30:.2f})", flush=True)
    return {"step": name, "seconds": round(seconds, 2), "peak_rss_bytes": peak, "sampled_rss_bytes": sampled[0],
            "load_before": round(load, 2)}


def setup(work: Path) -> None:
    """Tokenizer, base and LoRA (run in its own process by main, so this one stays small)."""
    tok = make_tokenizer(work / "tokenizer" / "tokenizer.model")
    make_base(work / "base", tok)
    make_lora(work / "lora", tok)


def find_sdist(work: Path) -> Path:
    cached = sorted(Path.home().glob(".cache/cllama-bench/llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if cached:
        return cached[-1].parents[2]
    from benchmarks.compare_with_llamacpp import get_sdist

    sdist_dir = work / "sdist"
    sdist_dir.mkdir(exist_ok=True)
    existing = [p for p in sdist_dir.iterdir() if p.is_dir()]
    return existing[0] if existing else get_sdist(sdist_dir)


SEED_MERGE = """
import shutil, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM
from peft import PeftModel
base, lora, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16, low_cpu_mem_usage=True)
model = PeftModel.from_pretrained(model, lora, dtype=torch.float16)
model = model.merge_and_unload()
model.save_pretrained(out, safe_serialization=True)
shutil.copy(Path(lora) / "tokenizer.model", Path(out) / "tokenizer.model")
"""

SEED_QUANTIZE = """
import ctypes, sys, llama_cpp
inp, out, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
p.nthread = threads
sys.exit(llama_cpp.llama_model_quantize(inp.encode(), out.encode(), ctypes.byref(p)))
"""


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--wrap-hwm":
        wrap_hwm(sys.argv[2:])
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--setup":
        SHAPE.update(SHAPES[sys.argv[3]])
        setup(Path(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description="deploy vs the seed's merge/convert/quantize path")
    ap.add_argument("--work", type=Path, default=Path("/tmp/deploy-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sdist", type=Path, help="unpacked llama-cpp-python sdist (default: ~/.cache/cllama-bench or "
                                               "download)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--only", choices=["ours", "seed"], help="run one side only")
    ap.add_argument("--shape", choices=list(SHAPES), default="tinyllama",
                    help="model shape (smoke: a quick check that the script runs; give it its own --work)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate ours/seed this many times; the table shows medians (peaks: maxima)")
    args = ap.parse_args()
    SHAPE.update(SHAPES[args.shape])
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable

    base, lora = work / "base", work / "lora"
    if not (base / "config.json").is_file() or not (lora / "adapter_config.json").is_file():
        t0 = time.perf_counter()
        subprocess.run([py, str(Path(__file__).resolve()), "--setup", str(work), args.shape], check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
        print(f"setup (own process): {time.perf_counter() - t0:.0f}s", flush=True)
    if args.sdist is None and args.only != "ours":
        args.sdist = find_sdist(work)
    env = dict(os.environ, PYTHONPATH=str(ROOT), CLLAMA_N_THREADS=str(args.threads))

    import psutil

    results: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                 "mem_gib": round(psutil.virtual_memory().total / 2**30, 1)},
                     "threads": args.threads, "model": SHAPE, "seed": [], "ours": [],
                     "peak_rss_method": "each step's own VmHWM (written by the step's process as it exits)"}
    for rnd in range(args.rounds):
        if args.only != "seed":
            out = work / "ours"
            shutil.rmtree(out, ignore_errors=True)
            r = run_step("ours: deploy", ["-m", "cllama_deploy", "deploy", "--base", str(base), "--lora", str(lora),
                                          "--quant", "Q4_K_M", "--out", str(out), "--name", "bench",
                                          "--threads", str(args.threads), "-q"], work / "ours.log", env)
            manifest = json.loads((out / "manifest.json").read_text())
            r["steps"] = {s["name"]: {"seconds": s["seconds"], "peak_rss_bytes": s["peak_rss_bytes"],
                                      "timings": s.get("timings")} for s in manifest["steps"]}
            r["manifest_seconds"] = manifest["seconds"]
            # deploy resets its own high-water mark at every step (to measure each), so the whole run's
            # peak is the manifest's (every step's peak and what came before)
            r["peak_rss_bytes"] = max(r["peak_rss_bytes"], manifest.get("peak_rss_bytes") or 0)
            results["ours"].append(r)
        if args.only != "ours":
            merged, f16, q4 = work / "seed-merged", work / "seed-f16.gguf", work / "seed-Q4_K_M.gguf"
            shutil.rmtree(merged, ignore_errors=True)
            script = args.sdist / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
            results["seed"].append([
                run_step("seed: peft merge + save_pretrained", ["-c", SEED_MERGE, str(base), str(lora), str(merged)],
                         work / "seed-merge.log", env),
                run_step("seed: convert_hf_to_gguf.py f16", [str(script), str(merged), "--outfile", str(f16),
                                                             "--outtype", "f16"], work / "seed-convert.log", env),
                run_step("seed: quantize Q4_K_M", ["-c", SEED_QUANTIZE, str(f16), str(q4), str(args.threads)],
                         work / "seed-quantize.log", env),
            ])

    if results["ours"] and results["seed"]:
        med = statistics.median
        ours = {"seconds": med(r["seconds"] for r in results["ours"]),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results["ours"]),
                "steps": {name: {"seconds": med(r["steps"][name]["seconds"] for r in results["ours"]),
                                 "peak_rss_bytes": max(r["steps"][name]["peak_rss_bytes"] for r in results["ours"])}
                          for name in results["ours"][0]["steps"]}}
        seed = [{"step": results["seed"][0][k]["step"],
                 "seconds": med(rnd[k]["seconds"] for rnd in results["seed"]),
                 "peak_rss_bytes": max(rnd[k]["peak_rss_bytes"] for rnd in results["seed"])} for k in range(3)]
        ours_mc = ours["steps"]["convert"]["seconds"]
        ours_q = ours["steps"]["quantize Q4_K_M"]["seconds"]
        ours_other = ours["seconds"] - ours_mc - ours_q  # start-up, checks, hashing, manifest
        seed_mc = seed[0]["seconds"] + seed[1]["seconds"]
        seed_total = sum(s["seconds"] for s in seed)
        seed_peak = max(s["peak_rss_bytes"] for s in seed)
        results["ratios"] = {
            "peak_rss": round(ours["peak_rss_bytes"] / seed_peak, 3),
            "merge_convert_time": round((ours_mc + ours_other) / seed_mc, 3),
            "total_time": round(ours["seconds"] / seed_total, 3),
            "total_time_quantize_excluded": round((ours["seconds"] - ours_q) / (seed_total - seed[2]["seconds"]), 3),
            "quantize_step": round(ours_q / seed[2]["seconds"], 3),
        }
        per_round = [{"ours_total": r["seconds"], "seed_total": round(sum(x["seconds"] for x in s), 2),
                      "ours_quantize": r["steps"]["quantize Q4_K_M"]["seconds"], "seed_quantize": s[2]["seconds"],
                      "load_before": [r["load_before"]] + [x["load_before"] for x in s]}
                     for r, s in zip(results["ours"], results["seed"])]
        results["per_round"] = per_round
        results["bars"] = {"peak_rss": 0.3, "merge_convert_time": 0.5, "total_time": 0.85}
        print(json.dumps(results["ratios"], indent=2))
        print(f"\n{args.rounds} round(s); medians of wall time, maxima of peak RSS (each process's own VmHWM)")
        print("\n| path | step | wall s | peak RSS GiB |\n|---|---|---:|---:|")
        for s in seed:
            print(f"| seed | {s['step'][6:]} | {s['seconds']:.1f} | {s['peak_rss_bytes'] / 2**30:.2f} |")
        print(f"| seed | **total** | {seed_total:.1f} | {seed_peak / 2**30:.2f} |")
        for name, s in ours["steps"].items():
            label = "merge + convert (in-process)" if name == "convert" else f"{name} (in-process)"
            print(f"| ours | {label} | {s['seconds']:.1f} | {s['peak_rss_bytes'] / 2**30:.2f} |")
        print(f"| ours | start-up, checks, hashing, manifest | {ours_other:.1f} | |")
        print(f"| ours | **total (one process)** | {ours['seconds']:.1f} | {ours['peak_rss_bytes'] / 2**30:.2f} |")
        print("\nours' quantize step, where the time went (per round):")
        for r in results["ours"]:
            print(f"  {r['steps']['quantize Q4_K_M']['seconds']:.1f}s: {r['steps']['quantize Q4_K_M']['timings']}")
        print("per round (load average before each step: ours, seed merge, convert, quantize):")
        for k, pr in enumerate(per_round):
            print(f"  {k + 1}: ours {pr['ours_total']:.1f}s (quantize {pr['ours_quantize']:.1f}), seed "
                  f"{pr['seed_total']:.1f}s (quantize {pr['seed_quantize']:.1f}); load {pr['load_before']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
