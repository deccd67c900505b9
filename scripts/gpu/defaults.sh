#!/usr/bin/env bash
# The weight type `qwenvl run --device cuda` picks without --quant, against the card's free memory:
# sparse checkpoints (sizes on paper, nothing on disk) of ½, 1.2 and 3 times the free memory, and
# 1 TB. Expected: bf16, q8_0, q4k, refused. Each load then stops at the empty shard, which is fine:
# only the choice is checked. Usage: scripts/gpu/defaults.sh QWENVL_BINARY FIXTURE_DIR
set -u
bin=$1 fixture=$2
free_mib=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits | head -1)
free=$((free_mib * 1024 * 1024))
echo "GPU free memory: $free_mib MiB"
conv=$(mktemp -d)/c.json
echo '{"query": [{"text": "hi"}]}' > "$conv"
status=0
for case in "$((free / 2)) bf16" "$((free * 12 / 10)) q8_0" "$((free * 3)) q4k" "$((1 << 40)) refused"; do
  set -- $case
  dir=$(mktemp -d)
  cp "$fixture"/{config.json,generation_config.json,qwen.tiktoken} "$dir"/
  truncate -s "$1" "$dir/model.safetensors"
  err=$(env -u QWENVL_WEIGHTS "$bin" run --model "$dir" --conversation "$conv" --device cuda 2>&1 >/dev/null)
  if [ "$2" = refused ]; then
    echo "$err" | grep -q "not enough memory.*on the GPU" && r=ok || r=FAIL
  else
    echo "$err" | grep -q "as $2…" && r=ok || r=FAIL
  fi
  [ "$r" = ok ] || status=1
  printf '%-4s %6d GB checkpoint -> expected %-7s | %s\n' "$r" $(($1 >> 30)) "$2" "$(echo "$err" | head -2 | tr '\n' ' ')"
  rm -rf "$dir"
done
exit $status
