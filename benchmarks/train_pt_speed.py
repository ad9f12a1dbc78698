"""Benchmark: tokens/s of `train pt` versus a plain HF Trainer + peft script doing the same work.

Same small random LLaMA (49953 vocabulary, the merged Chinese-LLaMA tokenizer), same blocks of real
Chinese text, same LoRA (the seed's r 8 / alpha 32 / dropout 0.05 on all projections + embed_tokens and
lm_head saved), same batch, steps and threads; no checkpoints in the timed window. The baseline is what
the seed's run_clm_pt_with_peft.py does at its core (tokenize, group, get_peft_model, Trainer.train).
Runs alternate (ours, plain, ours, plain, ...) and the median train-loop time of each is reported.

    .venv/bin/python benchmarks/train_pt_speed.py [--steps 20] [--repeats 2] [--threads 1]

Needs bench-out/train_init/merged_tok (made by train_init_bench.py) and bench-data/deb/x (see there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_hf_peft(model_dir: Path, tok_dir: Path, data_dir: Path, out: Path, steps: int, batch: int,
                  block: int) -> float:
    """The seed's approach, without our wrapper: returns seconds spent in trainer.train()."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    from cllama_deploy.tokenizer.hf import load_tokenizer

    tok = load_tokenizer(tok_dir)
    lines = []
    for f in sorted(data_dir.glob("*.txt")):
        lines += [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    ds = Dataset.from_dict({"text": lines})
    ds = ds.map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])

    def group(b):
        ids = sum(b["input_ids"], [])
        n = len(ids) // block * block
        chunks = [ids[i:i + block] for i in range(0, n, block)]
        return {"input_ids": chunks, "labels": [c[:] for c in chunks]}

    ds = ds.map(group, batched=True, batch_size=10000, remove_columns=ds.column_names)
    set_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=32, lora_dropout=0.05,
        target_modules=["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "up_proj"],
        modules_to_save=["embed_tokens", "lm_head"]))
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=0.01,
                             logging_steps=10, save_strategy="no", report_to=[], use_cpu=True,
                             dataloader_pin_memory=False, disable_tqdm=True, seed=0)

    def collate(f):
        x = torch.tensor([e["input_ids"] for e in f])
        return {"input_ids": x, "labels": x.clone()}

    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collate)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def ours(model_dir: Path, tok_dir: Path, data_dir: Path, out: Path, steps: int, batch: int, block: int) -> tuple[float, int]:
    from cllama_deploy.training.config import PTConfig
    from cllama_deploy.training.run import train

    cfg = PTConfig(model_name_or_path=str(model_dir), tokenizer_name_or_path=str(tok_dir), dataset_dir=str(data_dir),
                   output_dir=str(out), overwrite_output_dir=True, block_size=block,
                   per_device_train_batch_size=batch, max_steps=steps, save_steps=10**6, logging_steps=10,
                   validation_split_percentage=0.0, progress_bar=False, seed=0)
    res = train(cfg, show_summary=False)
    return res.train_seconds, res.tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench-out/train_speed"))
    ap.add_argument("--tok", default=str(ROOT / "bench-out/train_init/merged_tok"))
    ap.add_argument("--deb", default=str(ROOT / "bench-data/deb/x"))
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.train_init_bench import load_text

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    lines, poems = load_text(Path(args.deb))
    (data_dir / "zh.txt").write_text("\n".join(lines + poems) + "\n", encoding="utf-8")
    tok_dir = Path(args.tok)
    model_dir = out / "model"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        import sentencepiece as spm

        n = spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model")).get_piece_size()
        cfg = LlamaConfig(vocab_size=n, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                          bos_token_id=1, eos_token_id=2)
        LlamaForCausalLM(cfg).save_pretrained(model_dir)
        import shutil

        shutil.copy(tok_dir / "tokenizer.model", model_dir / "tokenizer.model")

    tokens = args.steps * args.batch * args.block
    t_ours, t_plain = [], []
    for r in range(args.repeats):
        s, n = ours(model_dir, tok_dir, data_dir, out / "ours", args.steps, args.batch, args.block)
        assert n == tokens, (n, tokens)
        t_ours.append(s)
        t_plain.append(plain_hf_peft(model_dir, tok_dir, data_dir, out / "plain", args.steps, args.batch, args.block))
        print(f"repeat {r}: ours {tokens / t_ours[-1]:.0f} tok/s, plain HF Trainer + peft {tokens / t_plain[-1]:.0f} tok/s")
    mo, mp = statistics.median(t_ours), statistics.median(t_plain)
    res = {"tokens_per_run": tokens, "ours_tok_s": tokens / mo, "plain_tok_s": tokens / mp, "ratio": mp / mo,
           "ours_s": t_ours, "plain_s": t_plain}
    print(json.dumps(res, indent=1))
    print(f"ours / plain tokens/s = {res['ratio']:.3f}")


if __name__ == "__main__":
    main()
