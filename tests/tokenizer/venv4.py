"""A virtual environment with transformers 4.x beside the project's transformers 5, for the
compatibility test and benchmark (tests/tokenizer/test_transformers4.py, benchmarks/transformers4_compat.py).

Built once per machine into a cache folder and reused (measured: ~45 s from the pip cache on the 2-core
machine while other jobs ran; 0 s when it exists). torch is pinned to the CPU build 2.13.0 that the
project's venv uses (the pip configuration of these machines serves it from a local wheel); a venv that
ends up with any other torch (a CUDA build) is refused and deleted, never used.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

TRANSFORMERS4 = "4.57.6"  # the newest 4.x: what vLLM < 0.19.1 and TGI run on
TORCH = "2.13.0"
PACKAGES = (f"torch=={TORCH}", f"transformers=={TRANSFORMERS4}", "sentencepiece", "protobuf")
CACHE = Path(os.environ.get("CLLAMA_TF4_CACHE", Path.home() / ".cache" / "cllama-deploy"))
PROBE = Path(__file__).with_name("transformers_probe.py")


def venv_dir(transformers: str = TRANSFORMERS4) -> Path:
    return CACHE / f"venv-transformers-{transformers}-torch-{TORCH}"


def _check(python: Path, transformers: str) -> str | None:
    """None when ``python`` has the pinned transformers and the CPU torch, else what is wrong."""
    code = ("import torch, transformers; print(transformers.__version__, torch.__version__, "
            "torch.version.cuda)")
    run = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if run.returncode != 0:
        return run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"
    tf, torch_version, cuda = run.stdout.split()
    if tf != transformers or torch_version != f"{TORCH}+cpu" or cuda != "None":
        return f"got transformers {tf}, torch {torch_version} (cuda {cuda}); want {transformers}, {TORCH}+cpu"
    return None


def transformers4_python(transformers: str = TRANSFORMERS4, extra: tuple[str, ...] = ()) -> Path:
    """The interpreter of the cached transformers-4 venv, built (atomically, under a lock) if missing.

    Raises:
        RuntimeError: pip failed (no network and no pip cache) or installed another torch than the CPU
            build; the message has pip's last lines.
    """
    target = venv_dir(transformers)
    python = target / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.is_file() and _check(python, transformers) is None:
            return python
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(partial)], check=True)
        pins = [p if not p.startswith("transformers==") else f"transformers=={transformers}" for p in PACKAGES]
        pip = subprocess.run([sys.executable, "-m", "pip", "--python", str(partial / "bin" / "python"), "install",
                              "--quiet", "--disable-pip-version-check", *pins, *extra],
                             capture_output=True, text=True)
        problem = (pip.stderr.strip().splitlines()[-3:] if pip.returncode else None) or \
            _check(partial / "bin" / "python", transformers)
        if problem:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"could not build the transformers {transformers} venv: {problem}")
        partial.rename(target)
    return python


def run_probe(python: Path | str, job: dict, work: Path) -> dict:
    """Run transformers_probe.py on ``job`` under ``python`` (offline, one thread); its JSON result.

    Raises:
        RuntimeError: the probe failed (the message ends with its stderr).
    """
    spec = Path(work) / "probe-job.json"
    spec.write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
    run = subprocess.run([str(python), str(PROBE), str(spec)], capture_output=True, text=True, timeout=1800,
                         env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                              "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                              "TRANSFORMERS_VERBOSITY": "error"})
    if run.returncode:
        raise RuntimeError(f"the probe failed under {python}:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout)
