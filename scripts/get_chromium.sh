#!/usr/bin/env bash
# Installs Debian's chromium (what the browser tests drive through Playwright; never a browser download) and a
# CJK font, so screenshots of Chinese chats show glyphs instead of boxes. Quiet, exit 0, when both are there.
# Needs root (CI runs as root) or sudo; the tests skip with a reason when chromium is absent.
set -euo pipefail
chromium="${GLMTUNE_CHROMIUM:-/usr/bin/chromium}"
packages=()
[ -x "$chromium" ] || packages+=(chromium)
fc-list :lang=zh 2>/dev/null | grep -q . || packages+=(fonts-wqy-microhei)
[ ${#packages[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >&2
$sudo apt-get install -y -q --no-install-recommends "${packages[@]}" >&2
"$chromium" --version >&2
