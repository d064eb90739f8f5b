#!/usr/bin/env bash
# Shared set-up for demo.sh and test.sh: a virtualenv in .venv with imgstore installed (editable).
# Idempotent and fast when already done. Installs Debian packages only when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# The read and write loops in Rust (native/): Debian's compiler and crates, so that it builds offline (.cargo/config.toml).
# Without them imgstore still installs and reads in Python; `imgstore --version` says which.
NATIVE=(cargo librust-pyo3-dev librust-blake3-dev librust-libc-dev librust-zstd-dev)
for pkg in "${NATIVE[@]}" "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${need_apt[@]}" >/dev/null
    else
        echo "setup: please install: ${need_apt[*]} (apt-get, as root)" >&2
    fi
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.imgstore-installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml native/Cargo.toml native/src -newer "$stamp" 2>/dev/null)" ]; then
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
