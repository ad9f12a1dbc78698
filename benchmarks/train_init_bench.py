"""Benchmark: initial loss on Chinese text after growing the vocabulary 32000 → 49953, by init method.

A small LLaMA is first trained (full training, HF Trainer) on real Chinese text tokenized with the
original LLaMA tokenizer, so its embeddings mean something. Its vocabulary is then grown to the merged
Chinese-LLaMA tokenizer with (a) our mean-of-pieces initialization, (b) transformers' default resize
(mean + covariance-shaped noise), (c) plain random rows (``mean_resizing=False``), and the loss on
held-out text tokenized with the merged tokenizer is measured before any further training. Loss per
token is compared between methods (same tokens); loss per character compares with the base model on
its own tokenization.

Data (not in the repository): the Debian Reference in Simplified Chinese and the Tang/Song poems,
``apt-get download fortunes-zh debian-reference-zh-cn`` then ``dpkg -x`` into bench-data/deb/x;
tokenizers from /work/shared/data (see its README).

    .venv/bin/python benchmarks/train_init_bench.py [--steps 300] [--threads 1]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def load_text(deb: Path) -> tuple[list[str], list[str]]:
    ref = gzip.open(deb / "usr/share/debian-reference/debian-reference.zh-cn.txt.gz", "rt", encoding="utf-8").read()
    lines = [ln.strip() for ln in ref.splitlines()]
    han = re.compile(r"[\u4e00-\u9fff]")
    lines = [ln for ln in lines if len(ln) >= 8 and len(han.findall(ln)) >= 4]
    poems = []
    for name in ("tang300", "song100"):
        raw = ANSI.sub("", (deb / "usr/share/games/fortunes" / name).read_text(encoding="utf-8"))
        poems += [ln.strip() for ln in raw.splitlines() if ln.strip() and ln.strip() != "%"]
    return lines, poems


def blocks(tok, lines: list[str], block: int):
    import torch

    ids = []
    for ln in lines:
        ids += [tok.bos_id] + tok.encode([ln])[0]
    n = len(ids) // block
    return torch.tensor(ids[: n * block]).view(n, block)


def eval_loss(model, data, batch: int = 16) -> float:
    import torch

    model.eval()
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(data), batch):
            x = data[i:i + batch]
            out = model(input_ids=x, labels=x)
            k = x.numel() - x.shape[0]
            tot += out.loss.item() * k
            cnt += k
    return tot / cnt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--deb", default=str(ROOT / "bench-data/deb/x"))
    ap.add_argument("--shared", default="/work/shared/data")
    ap.add_argument("--out", default=str(ROOT / "bench-out/train_init"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, set_seed

    from cllama_deploy.tokenizer.merge import TokenizerMergeConfig, merge_tokenizers
    from cllama_deploy.training.config import PTConfig
    from cllama_deploy.training.data import load_text_tokenizer
    from cllama_deploy.training.model import plan_vocab, resize_vocab

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base_tok_model = Path(args.shared) / "llama-tokenizer/tokenizer.model"
    merged_dir = out / "merged_tok"
    if not (merged_dir / "tokenizer.model").is_file():
        merge_tokenizers(TokenizerMergeConfig(base=base_tok_model, add=Path(args.shared) / "chinese_sp.model",
                                              out=merged_dir))
    base_tok = load_text_tokenizer(base_tok_model)
    merged_tok = load_text_tokenizer(merged_dir)
    print(f"tokenizers: base {len(base_tok)}, merged {len(merged_tok)}")

    lines, poems = load_text(Path(args.deb))
    cut = int(len(lines) * 0.85)
    train_lines, eval_lines = lines[:cut], lines[cut:]
    eval_chars = sum(len(ln) for ln in eval_lines)
    poem_chars = sum(len(ln) for ln in poems)

    # 1. a base model that has learned Chinese through the 32000-piece tokenizer
    base_dir = out / "base"
    set_seed(0)
    if not (base_dir / "config.json").is_file():
        config = LlamaConfig(vocab_size=len(base_tok), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                             bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        from datasets import Dataset

        train_blocks = blocks(base_tok, train_lines, args.block)
        ds = Dataset.from_dict({"input_ids": train_blocks.tolist()})
        targs = TrainingArguments(output_dir=str(out / "base_ckpt"), max_steps=args.steps,
                                  per_device_train_batch_size=8, learning_rate=3e-3, lr_scheduler_type="cosine",
                                  warmup_steps=0.05, logging_steps=50, save_strategy="no", report_to=[],
                                  use_cpu=True, dataloader_pin_memory=False, disable_tqdm=True)

        def collate(f):
            x = torch.tensor([e["input_ids"] for e in f])
            return {"input_ids": x, "labels": x}

        t0 = time.perf_counter()
        Trainer(model=model, args=targs, train_dataset=ds, data_collator=collate).train()
        print(f"base training: {args.steps} steps in {time.perf_counter() - t0:.0f} s")
        model.save_pretrained(base_dir)
        import shutil

        shutil.copy(base_tok_model, base_dir / "tokenizer.model")

    base = LlamaForCausalLM.from_pretrained(base_dir)
    ev_base = blocks(base_tok, eval_lines, args.block)
    ev_merged = blocks(merged_tok, eval_lines, args.block)
    po_merged = blocks(merged_tok, poems, args.block)
    po_base = blocks(base_tok, poems, args.block)
    results = {}
    l_base = eval_loss(base, ev_base)
    results["base model, base tokenizer (reference)"] = (l_base, ev_base.numel(), eval_loss(base, po_base),
                                                          po_base.numel())

    cfg = PTConfig(model_name_or_path=str(base_dir), tokenizer_name_or_path=str(merged_dir),
                   dataset_dir=str(out), output_dir=str(out / "unused"))
    plan = plan_vocab(cfg, merged_tok)
    for name in ("mean_of_pieces", "transformers default (mean_resizing=True)", "random rows (mean_resizing=False)"):
        set_seed(0)
        m = LlamaForCausalLM.from_pretrained(base_dir)
        t0 = time.perf_counter()
        if name == "mean_of_pieces":
            resize_vocab(m, plan, merged_tok, "mean_of_pieces")
        else:
            m.resize_token_embeddings(len(merged_tok), mean_resizing=name.startswith("transformers"))
        dt = time.perf_counter() - t0
        results[name] = (eval_loss(m, ev_merged), ev_merged.numel(), eval_loss(m, po_merged), po_merged.numel())
        print(f"{name}: resize {dt:.2f} s")

    rows = []
    print(f"\nheld-out Debian Reference: {eval_chars:,} chars; Tang/Song poems: {poem_chars:,} chars")
    print(f"{'init':45s} {'loss/token':>10s} {'tokens':>8s} {'nats/char':>9s} {'poems loss/token':>16s} {'poems nats/char':>15s}")
    for name, (l, ntok, lp, ntp) in results.items():
        per_char = l * ntok / eval_chars
        per_char_p = lp * ntp / poem_chars
        rows.append({"init": name, "loss_per_token": l, "tokens": ntok, "nats_per_char": per_char,
                     "poems_loss_per_token": lp, "poems_nats_per_char": per_char_p})
        print(f"{name:45s} {l:10.3f} {ntok:8d} {per_char:9.3f} {lp:16.3f} {per_char_p:15.3f}")
    ref = results["transformers default (mean_resizing=True)"][0]
    print(f"\nmean_of_pieces vs transformers default: initial loss {results['mean_of_pieces'][0]:.3f} vs {ref:.3f} "
          f"(ratio {results['mean_of_pieces'][0] / ref:.3f}); perplexity ratio "
          f"{math.exp(results['mean_of_pieces'][0] - ref):.4f}")
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
