#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine (system packages, the runtime and test
# requirements) and runs the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  # chromium: the browser test; libopenblas0-pthread: a fast BLAS for MLX's CPU backend
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libopenblas0-pthread >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -r requirements-dev.txt
source scripts/fast_blas.sh
exec python3 -m pytest -q "$@"
