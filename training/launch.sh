# Sourced by run_pt.sh and run_sft.sh: `launch STAGE NPROC ARGS...` runs one training stage under torchrun.
# A re-run with the same --output_dir (after a crash, say) continues from its latest complete checkpoint-N;
# nothing is deleted. To start over instead: append --overwrite_output_dir.
# The options are checked first, without torch (a mistake is one line and exit 2, in a second, before
# torchrun starts its processes); an error inside training is printed again after torchrun's report.
launch() {
  local stage=$1 nproc=$2
  shift 2
  "${PYTHON:-python}" -m cllama_deploy.training "$stage" --check "$@"
  local status=0
  error_file=$(mktemp)  # global: the EXIT trap reads it
  trap 'rm -f "$error_file"' EXIT
  CLLAMA_ERROR_FILE="$error_file" torchrun --nnodes 1 --nproc_per_node "$nproc" -m cllama_deploy.training "$stage" \
      "$@" || status=$?
  if [[ $status -ne 0 && -s "$error_file" ]]; then
    echo >&2
    awk '!seen[$0]++' "$error_file" >&2
    exit 2
  fi
  exit $status
}
