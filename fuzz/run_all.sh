#!/usr/bin/env bash
# Builds the fuzz targets once, then runs each for $SECS seconds (default 600), one after the
# other, on one core. Usage: fuzz/run_all.sh [target...]; logs go to fuzz/logs/<target>.log.
# (The binaries are run directly, so editing the sources during a run cannot break it.)
set -u
cd "$(dirname "$0")"
SECS=${SECS:-600}
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(checkpoint grounding tokenizer prompt image)
mkdir -p logs artifacts
RUSTC_BOOTSTRAP=1 nice -n 10 cargo fuzz build -s none -a > logs/build.log 2>&1 || {
    echo "== build failed: see logs/build.log" >> logs/summary.txt
    exit 1
}
BIN=target/x86_64-unknown-linux-gnu/release
for t in "${TARGETS[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    echo "== $t: $(date -u +%H:%M:%S) start" >> logs/summary.txt
    # Exactly what `cargo fuzz run -s none -a $t corpus/$t -- <flags>` runs after building.
    nice -n 10 "$BIN/$t" -max_total_time="$SECS" -jobs=1 -workers=1 -rss_limit_mb=3072 \
        -timeout=30 -artifact_prefix="artifacts/$t/" -print_final_stats=1 "corpus/$t" \
        > "logs/$t.log" 2>&1
    rc=$?
    # With -jobs, libFuzzer writes the run's output to fuzz-<job>.log in the current folder.
    if [ -f fuzz-0.log ]; then cat fuzz-0.log >> "logs/$t.log"; rm -f fuzz-0.log; fi
    echo "== $t: $(date -u +%H:%M:%S) rc=$rc $(grep -E 'stat::number_of_executed_units' "logs/$t.log" | tail -1)" >> logs/summary.txt
done
