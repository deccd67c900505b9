#!/usr/bin/env bash
# Screenshots of the real desktop window (wgpu renderer) under Xvfb: a chat with a picture,
# a Markdown reply (Chinese text, grounding chips, a code block) and its boxes in the dark theme;
# the picture viewer zoomed in with boxes and labels; the light theme. The clicks are at fixed
# positions of the 1180x800 window. Replies are scripted (QWENVL_DEMO=1): no model
# is needed. Usage: scripts/gui-screenshot.sh [OUT.png]   (default: target/gui-screenshot.png; also
# OUT-viewer.png and OUT-light.png)
#
# Needs (Debian): xvfb xauth imagemagick, and a Vulkan or GL driver for wgpu on a machine
# without a GPU: mesa-vulkan-drivers (lavapipe) and libgl1-mesa-dri / libegl-mesa0 (llvmpipe).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/gui-screenshot.png}
fixtures=${QWENVL_FIXTURES:-$(pwd)/../shared/fixtures}
photo="$fixtures/tiny-a/images/photo_640x480.jpg"

missing=()
for cmd in xvfb-run xauth import xdotool; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
if ((${#missing[@]})); then
    echo "installing xvfb xauth imagemagick xdotool mesa-vulkan-drivers (missing: ${missing[*]})" >&2
    apt-get update -qq && apt-get install -y -qq xvfb xauth imagemagick xdotool mesa-vulkan-drivers >/dev/null
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
      "user": [{"image": "$photo"}, {"text": "框出图中的红色方块和蓝色圆形，再给我一段读取尺寸的代码。"}],
      "reply": "## 图中的形状\n\n好的：<ref>红色方块</ref><box>(156,208),(406,541)</box>和<ref>蓝色圆形</ref><box>(656,312),(937,687)</box>。\n\n- **红色**方块在左上\n- 蓝色圆形在右边\n\n\`\`\`python\nfrom PIL import Image\nprint(Image.open(\"photo.jpg\").size)  # (640, 480)\n\`\`\`",
      "status": "Done",
      "stats": {"tokens": 42, "time_to_first_token_ms": 180.0, "tokens_per_s": 23.5, "cancelled": false}
    }
  ]
}
JSON

export QWENVL_DEMO=1 QWENVL_OPEN_CHAT="$tmp/chat.json" \
    QWENVL_DATA_DIR="$tmp/data" QWENVL_CONFIG_DIR="$tmp/config"
# Only X11 inside Xvfb, even if the caller has a Wayland session.
unset WAYLAND_DISPLAY
# Three shots of one real window, driven by real input (xdotool): the Markdown reply (dark
# theme), the picture viewer zoomed in with boxes and labels, and the light theme.
dir=${out%.png}
mkdir -p "$(dirname "$out")"
xvfb-run -a -s "-screen 0 1180x800x24" bash -c '
    set -e
    ${CARGO_TARGET_DIR:-target}/debug/qwenvl & pid=$!
    sleep "${QWENVL_SCREENSHOT_WAIT:-8}"
    import -window root "$0.png"
    # Open the reply'"'"'s picture (below the reply), zoom in twice about its middle.
    xdotool mousemove 430 640 sleep 0.5 mousedown 1 sleep 0.2 mouseup 1
    sleep 2
    xdotool mousemove 560 420 sleep 0.5 click 4 sleep 0.3 click 4 sleep 0.3 click 4
    sleep 2
    import -window root "$0-viewer.png"
    # Close the viewer; the theme toggle (system -> light) in the top bar.
    xdotool mousemove 697 90 sleep 0.3 mousedown 1 sleep 0.2 mouseup 1
    sleep 1
    xdotool mousemove 1047 12 sleep 0.3 mousedown 1 sleep 0.2 mouseup 1
    sleep 2
    import -window root "$0-light.png"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
' "$dir"
echo "wrote $dir.png (Markdown reply, dark) $dir-viewer.png (viewer zoomed) $dir-light.png (light theme)"
