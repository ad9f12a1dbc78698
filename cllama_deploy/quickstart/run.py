"""The embedded default (`cllama-deploy quickstart`, `make demo`): the vocabulary extension end to end.

Everything runs on text generated here (``quickstart.corpus``), nothing is downloaded:

1. a LLaMA-like base tokenizer (BPE, byte fallback, split digits) trained on mostly English text,
2. a Chinese unigram tokenizer trained with the seed's settings on synthetic Chinese,
3. both merged with the seed's recipe (with and without ``[PAD]``) into HF tokenizer directories
   that encode exactly like SentencePiece (checked on held-out lines),
4. token statistics of base vs merged on held-out Chinese and English text.

Later stages (train → deploy → serve) extend this module.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from cllama_deploy.errors import ConfigError

MARKER = "quickstart.json"


@dataclass
class QuickstartConfig:
    """Settings of ``cllama-deploy quickstart``."""

    out: Path = field(default=Path("demo-out"), metadata={"help": "output directory (replaced if it is a quickstart's)",
                                                         "flag": ("--out", "-o")})
    zh_lines: int = field(default=4000, metadata={"help": "lines of synthetic Chinese for the Chinese tokenizer"})
    en_lines: int = field(default=3000, metadata={"help": "lines of synthetic English for the base tokenizer"})
    base_vocab_size: int = field(default=600, metadata={"help": "pieces of the LLaMA-like base tokenizer"})
    zh_vocab_size: int = field(default=800, metadata={"help": "pieces of the Chinese tokenizer"})
    seed: int = field(default=0, metadata={"help": "seed of the generated text"})

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out} is a file; give a directory")
        if self.out.is_dir() and any(self.out.iterdir()) and not (self.out / MARKER).is_file():
            raise ConfigError(
                f"--out {self.out} exists and was not written by quickstart; choose a new directory "
                "(a quickstart output directory is replaced on re-runs)"
            )
        for flag, value, low in (("--zh-lines", self.zh_lines, 200), ("--en-lines", self.en_lines, 200),
                                 ("--base-vocab-size", self.base_vocab_size, 300),
                                 ("--zh-vocab-size", self.zh_vocab_size, 50)):
            if value < low:
                raise ConfigError(f"{flag} {value}: must be at least {low}")


@dataclass
class QuickstartResult:
    out: Path
    files: dict[str, Path]
    added_pieces: int
    total_pieces: int
    stats: dict
    parity: dict
    seconds: float


def run_quickstart(config: QuickstartConfig) -> QuickstartResult:
    """Generate text, train both tokenizers, merge, measure; write everything under ``config.out``."""
    from cllama_deploy.files import atomic_dir
    from cllama_deploy.progress import console
    from cllama_deploy.quickstart.corpus import chinese_lines, english_lines, write_lines
    from cllama_deploy.tokenizer.merge import TokenizerMergeConfig, merge_tokenizers
    from cllama_deploy.tokenizer.stats import StatsConfig, stats_table, tokenizer_stats
    from cllama_deploy.tokenizer.train import TokenizerTrainConfig, train_tokenizer

    start = time.perf_counter()
    s = config.seed
    with atomic_dir(config.out) as tmp:
        console.print("[bold]1/4[/] generating synthetic corpora")
        corpus = tmp / "corpus"
        # The base sees mostly English with a little Chinese, like LLaMA's training mix.
        base_txt = write_lines(corpus / "base.txt",
                               english_lines(config.en_lines, seed=s) + chinese_lines(config.en_lines // 30, seed=s + 1))
        zh_txt = write_lines(corpus / "zh.txt", chinese_lines(config.zh_lines, seed=s + 2))
        zh_eval = write_lines(corpus / "zh_heldout.txt", chinese_lines(500, seed=s + 3))
        en_eval = write_lines(corpus / "en_heldout.txt", english_lines(500, seed=s + 4))

        console.print("[bold]2/4[/] training tokenizers (tokenizer train)")
        base = train_tokenizer(TokenizerTrainConfig.llama_like([base_txt], tmp / "base" / "tokenizer.model",
                                                               vocab_size=config.base_vocab_size, num_threads=1,
                                                               character_coverage=0.9995))
        zh = train_tokenizer(TokenizerTrainConfig(inputs=[zh_txt], out=tmp / "chinese_sp.model",
                                                  vocab_size=config.zh_vocab_size, num_threads=1))
        console.print(f"  base: {base.pieces} pieces (BPE, byte fallback); Chinese: {zh.pieces} pieces (unigram)")

        console.print("[bold]3/4[/] merging (tokenizer merge)")
        merged = merge_tokenizers(TokenizerMergeConfig(base=base.model_path, add=zh.model_path, out=tmp / "merged"))
        alpaca = merge_tokenizers(TokenizerMergeConfig(base=base.model_path, add=zh.model_path,
                                                       out=tmp / "merged-pad", pad_token=True))
        console.print(f"  {merged.base_pieces} + {merged.added_pieces} = {merged.total_pieces} pieces "
                      f"(+[PAD]: {alpaca.total_pieces})")
        parity = _check_parity(tmp / "merged", zh_eval, en_eval)

        console.print("[bold]4/4[/] token statistics (tokenizer stats)")
        stats = tokenizer_stats(StatsConfig(base=base.model_path, tokenizer=tmp / "merged", files=[zh_eval, en_eval]))
        console.print(stats_table(stats, labels=("base/tokenizer.model", "merged/")))
        (tmp / "stats.json").write_text(json.dumps(stats.as_dict(), indent=2, ensure_ascii=False) + "\n")
        rel = lambda p: str(Path(p).relative_to(tmp))  # noqa: E731
        files = {
            "base tokenizer (LLaMA-like BPE)": rel(base.model_path),
            "Chinese tokenizer (unigram)": rel(zh.model_path),
            "merged tokenizer + HF dir": rel(tmp / "merged"),
            "merged + [PAD] (Alpaca) + HF dir": rel(tmp / "merged-pad"),
            "token statistics": "stats.json",
            "corpora": "corpus/",
        }
        summary = {"files": files, "added_pieces": merged.added_pieces, "total_pieces": merged.total_pieces,
                   "hf_parity": parity, "ratio_zh": stats.files[0].ratio, "ratio_en": stats.files[1].ratio}
        (tmp / MARKER).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return QuickstartResult(
        out=config.out, files={k: config.out / v for k, v in files.items()}, added_pieces=merged.added_pieces,
        total_pieces=merged.total_pieces, stats=stats.as_dict(), parity=parity,
        seconds=time.perf_counter() - start,
    )


def _check_parity(hf_dir: Path, *files: Path) -> dict:
    """AutoTokenizer on the written dir must encode like SentencePiece (when transformers is installed)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:  # core install: no transformers, nothing to compare
        return {"checked": False}
    from cllama_deploy.errors import TokenizerError
    from cllama_deploy.tokenizer.hf import compare_with_sentencepiece

    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    lines = [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    report = compare_with_sentencepiece(tok, hf_dir / "tokenizer.model", lines)
    if report["mismatches"]:
        raise TokenizerError(f"AutoTokenizer encodes {report['mismatches']} of {report['lines']} lines unlike "
                             "SentencePiece; this is a bug in cllama-deploy")
    return {"checked": True, "lines": report["lines"], "mismatches": 0, "class": type(tok).__name__}
