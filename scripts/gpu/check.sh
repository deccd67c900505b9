#!/usr/bin/env bash
# The one GPU check, run on the GPU machine from the repository root (nothing is built there):
# golden fixtures in f32 and bf16 on the GPU, the default weight type against the card's free
# memory (scripts/gpu/defaults.sh), then `qwenvl bench` on full-size random weights in
# bf16 and q8_0, with the GPU's memory use sampled by nvidia-smi. Expects what
# scripts/gpu/build-cuda.sh packed into .gpu/ (the CUDA build of qwenvl and the tiny-a fixture).
# Results go to $OUT (or /tmp/gpu-out). GPU_CHECKS picks parts (default: "golden defaults bench").
set -u
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out" /tmp/fx
tar -xJf .gpu/tiny-a.tar.xz -C /tmp/fx
xz -dc .gpu/qwenvl.xz > /tmp/qwenvl && chmod +x /tmp/qwenvl

# The CUDA libraries qwenvl links (cuBLAS, cuRAND, NVRTC, the runtime) come with PyTorch's wheels;
# libcuda comes with the driver.
libdirs=$(for l in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
  find / -xdev -name "$l" -not -path '*/proc/*' 2>/dev/null | head -1 | xargs -r dirname; done | sort -u | tr '\n' ':')
export LD_LIBRARY_PATH="${libdirs}${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
ldd /tmp/qwenvl | grep -E "cuda|cublas|curand|nvrtc" | tee -a "$out/gpu.txt"

status=0
checks=" ${GPU_CHECKS:-golden defaults bench} "
[[ $checks == *" golden "* ]] && for dtype in f32 bf16; do
  timeout 150 python3 scripts/gpu/golden.py --qwenvl /tmp/qwenvl --fixture /tmp/fx/tiny-a \
    --device cuda --dtype "$dtype" 2>&1 | tee "$out/golden-$dtype.txt" || status=1
done

if [[ $checks == *" defaults "* ]]; then
  bash scripts/gpu/defaults.sh /tmp/qwenvl /tmp/fx/tiny-a 2>&1 | tee "$out/defaults.txt" || status=1
fi

[[ $checks == *" bench "* ]] && for quant in ${GPU_BENCH_QUANTS:-bf16 q8_0}; do
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$out/mem-$quant.log" &
  smi=$!
  timeout "${GPU_BENCH_TIMEOUT:-200}" /tmp/qwenvl bench --random qwen-vl-chat --device cuda \
    --quant "$quant" --decode-tokens 128 2>&1 | tee "$out/bench-$quant.txt" || status=1
  kill $smi 2>/dev/null
  echo "peak GPU memory used: $(sort -n "$out/mem-$quant.log" | tail -1) MiB" | tee -a "$out/bench-$quant.txt"
done
exit $status
