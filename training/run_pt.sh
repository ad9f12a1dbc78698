#!/usr/bin/env bash
# LoRA incremental pre-training: the seed's run_pt.sh recipe on cllama-deploy.
# Edit the paths, then: bash training/run_pt.sh   (NPROC=N for N GPUs; DEEPSPEED=0 to run without DeepSpeed)
set -euo pipefail

pretrained_model=${PRETRAINED_MODEL:-path/to/hf/llama/dir}
chinese_tokenizer_path=${TOKENIZER:-path/to/chinese/llama/tokenizer/dir}
dataset_dir=${DATASET_DIR:-path/to/pt/data/dir}
data_cache=${DATA_CACHE:-temp_data_cache_dir}
output_dir=${OUTPUT_DIR:-output_dir}
nproc=${NPROC:-1}

lr=2e-4
lora_rank=8
lora_alpha=32
lora_trainable="q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"
modules_to_save="embed_tokens,lm_head"
lora_dropout=0.05
per_device_train_batch_size=1
gradient_accumulation_steps=1
block_size=512

ds_args=()
if [[ "${DEEPSPEED:-1}" == "1" ]]; then
  ds_args=(--deepspeed "$(dirname "$0")/ds_zero2_no_offload.json")
fi

# --validation_split_percentage is a real percentage here (the seed passed a fraction: 0.001 = 0.1%).
args=(
  "${ds_args[@]}"
  --model_name_or_path "${pretrained_model}"
  --tokenizer_name_or_path "${chinese_tokenizer_path}"
  --dataset_dir "${dataset_dir}"
  --data_cache_dir "${data_cache}"
  --validation_split_percentage 0.1
  --per_device_train_batch_size ${per_device_train_batch_size}
  --do_train
  --seed $RANDOM
  --fp16
  --max_steps 100
  --lr_scheduler_type cosine
  --learning_rate ${lr}
  --warmup_ratio 0.05
  --weight_decay 0.01
  --logging_strategy steps
  --logging_steps 10
  --save_strategy steps
  --save_total_limit 3
  --save_steps 500
  --gradient_accumulation_steps ${gradient_accumulation_steps}
  --preprocessing_num_workers 8
  --block_size ${block_size}
  --output_dir "${output_dir}"
  --ddp_timeout 30000
  --logging_first_step True
  --lora_rank ${lora_rank}
  --lora_alpha ${lora_alpha}
  --trainable ${lora_trainable}
  --modules_to_save ${modules_to_save}
  --lora_dropout ${lora_dropout}
  --torch_dtype float16
  --gradient_checkpointing
  --ddp_find_unused_parameters False
)

source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
launch pt "${nproc}" "${args[@]}" "$@"
