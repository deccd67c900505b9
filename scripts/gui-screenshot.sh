#!/usr/bin/env bash
# Screenshot of the real desktop window (wgpu renderer) under Xvfb, showing a chat with a
# picture, Chinese text and grounding boxes. Replies are scripted (QWENVL_DEMO=1): no model
# is needed. Usage: scripts/gui-screenshot.sh [OUT.png]   (default: target/gui-screenshot.png)
#
# Needs (Debian): xvfb xauth imagemagick, and a Vulkan or GL driver for wgpu on a machine
# without a GPU: mesa-vulkan-drivers (lavapipe) and libgl1-mesa-dri / libegl-mesa0 (llvmpipe).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/gui-screenshot.png}
fixtures=${QWENVL_FIXTURES:-$(pwd)/../shared/fixtures}
photo="$fixtures/tiny-a/images/photo_640x480.jpg"

missing=()
for cmd in xvfb-run xauth import; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if ((${#missing[@]})); then
    echo "installing xvfb xauth imagemagick mesa-vulkan-drivers (missing: ${missing[*]})" >&2
    apt-get update -qq && apt-get install -y -qq xvfb xauth imagemagick mesa-vulkan-drivers >/dev/null
fi
[[ -f "$photo" ]] || { echo "missing $photo (set QWENVL_FIXTURES)" >&2; exit 1; }

cargo build -q -p qwenvl
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A saved chat in the app's own format; the picture is imported into the chat store on open.
cat >"$tmp/chat.json" <<JSON
{
  "version": 1,
  "id": "chat-demo",
  "title": "图中的形状",
  "created": 1764000000,
  "system": "You are a helpful assistant.",
  "turns": [
    {
      "user": [{"image": "$photo"}, {"text": "框出图中的红色方块和蓝色圆形。"}],
      "reply": "好的：<ref>红色方块</ref><box>(156,208),(406,541)</box>，<ref>蓝色圆形</ref><box>(656,312),(937,687)</box>。",
      "status": "Done",
      "stats": {"tokens": 42, "time_to_first_token_ms": 180.0, "tokens_per_s": 23.5, "cancelled": false}
    },
    {
      "user": [{"image": "$photo"}, {"text": "What is in this region?"}, {"box": [[600, 250, 980, 720]]}],
      "reply": "这个区域里是一个蓝色圆形，背景是彩色渐变。",
      "status": "Done",
      "stats": {"tokens": 17, "time_to_first_token_ms": 95.0, "tokens_per_s": 25.1, "cancelled": false}
    }
  ]
}
JSON

export QWENVL_DEMO=1 QWENVL_OPEN_CHAT="$tmp/chat.json" \
    QWENVL_DATA_DIR="$tmp/data" QWENVL_CONFIG_DIR="$tmp/config"
# Only X11 inside Xvfb, even if the caller has a Wayland session.
unset WAYLAND_DISPLAY
xvfb-run -a -s "-screen 0 1180x800x24" bash -c '
    target/debug/qwenvl & pid=$!
    sleep "${QWENVL_SCREENSHOT_WAIT:-8}"
    import -window root "$0"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
' "$out"
echo "wrote $out"
