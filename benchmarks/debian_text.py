"""Real Chinese text for the tokenizer benchmarks, from Debian packages (never stored in the repo).

``apt-get download fortunes-zh debian-reference-zh-cn`` into a cache directory outside the
repository, unpacked with ``dpkg -x``:

* ``debian_reference``: the Debian Reference in Simplified Chinese (mixed Chinese/English prose, .txt.gz)
* ``tang300``: 300 Tang poems, ``song100``: 100 Song lyrics (fortune files, ``%`` separators)
* ``chinese``: the ``chinese`` fortune file (Debian community texts, quotes, proverbs; ~2 MB)
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

PACKAGES = ("fortunes-zh", "debian-reference-zh-cn")
FILES = {
    "debian_reference": "usr/share/debian-reference/debian-reference.zh-cn.txt.gz",
    "tang300": "usr/share/games/fortunes/tang300",
    "song100": "usr/share/games/fortunes/song100",
    "chinese": "usr/share/games/fortunes/chinese",
}
CACHE = Path(os.environ.get("CLLAMA_BENCH_CACHE", Path.home() / ".cache" / "cllama-deploy" / "debian-text"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def debian_texts(cache: Path = CACHE) -> dict[str, Path]:
    """Paths of the unpacked texts; downloads and unpacks the packages on first use."""
    root = cache / "root"
    if not all((root / rel).is_file() for rel in FILES.values()):
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", *PACKAGES], cwd=cache, check=True, capture_output=True)
        for deb in sorted(cache.glob("*.deb")):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
    return {name: root / rel for name, rel in FILES.items()}


def clean_fortune_file(src: Path, dst: Path) -> Path:
    """A fortune file as plain lines: no ``%`` separators, no terminal colour escapes."""
    lines = []
    for line in src.read_text(encoding="utf-8").splitlines():
        line = ANSI.sub("", line).rstrip()
        if line.strip() and line.strip() != "%":
            lines.append(line)
    dst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return dst
