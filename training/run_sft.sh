#!/usr/bin/env bash
# LoRA instruction fine-tuning: the seed's run_sft.sh recipe on cllama-deploy ("Plus": merge the PT
# adapter first with PT_LORA=dir). Edit the paths, then: bash training/run_sft.sh
set -euo pipefail

pretrained_model=${PRETRAINED_MODEL:-path/to/hf/llama/dir}
chinese_tokenizer_path=${TOKENIZER:-path/to/chinese/alpaca/tokenizer/dir}
dataset_dir=${DATASET_DIR:-path/to/sft/data/dir}
validation_file=${VALIDATION_FILE:-}
data_cache=${DATA_CACHE:-temp_data_cache_dir}
output_dir=${OUTPUT_DIR:-output_dir}
nproc=${NPROC:-1}

lr=1e-4
lora_rank=8
lora_alpha=32
lora_trainable="q_proj,v_proj,k_proj,o_proj,gate_proj,down_proj,up_proj"
modules_to_save="embed_tokens,lm_head"
lora_dropout=0.05
per_device_train_batch_size=1
gradient_accumulation_steps=8
max_seq_length=512

extra=()
if [[ "${DEEPSPEED:-1}" == "1" ]]; then
  extra+=(--deepspeed "$(dirname "$0")/ds_zero2_no_offload.json")
fi
if [[ -n "${PT_LORA:-}" ]]; then
  extra+=(--lora "${PT_LORA}")
fi
if [[ -n "${validation_file}" ]]; then
  extra+=(--validation_file "${validation_file}")
fi

args=(
  "${extra[@]}"
  --model_name_or_path "${pretrained_model}"
  --tokenizer_name_or_path "${chinese_tokenizer_path}"
  --dataset_dir "${dataset_dir}"
  --data_cache_dir "${data_cache}"
  --per_device_train_batch_size ${per_device_train_batch_size}
  --per_device_eval_batch_size ${per_device_train_batch_size}
  --do_train
  --do_eval
  --seed $RANDOM
  --fp16
  --num_train_epochs 1
  --lr_scheduler_type cosine
  --learning_rate ${lr}
  --warmup_ratio 0.03
  --weight_decay 0
  --logging_strategy steps
  --logging_steps 10
  --save_strategy steps
  --save_total_limit 3
  --eval_steps 100
  --save_steps 200
  --gradient_accumulation_steps ${gradient_accumulation_steps}
  --preprocessing_num_workers 8
  --max_seq_length ${max_seq_length}
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
launch sft "${nproc}" "${args[@]}" "$@"
