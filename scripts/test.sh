#!/usr/bin/env bash
# The README's second command: install everything the tests need (as root: Debian packages, a
# PostgreSQL server, the PXE lab's qemu/tftpd/kernel) and run the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not vm" -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh debootstrap squashfs-tools acl attr rsync zstd postgresql libcap2-bin strace
if [ "$(id -u)" = 0 ]; then
    .ci/install-pxe-deps.sh >/dev/null
    # PostgreSQL for the multi-server tests: the Debian cluster, started by us on loopback only.
    if command -v pg_ctlcluster >/dev/null; then
        ver=$(ls /usr/lib/postgresql | sort -n | tail -1)
        pg_lsclusters -h | grep -q "^$ver main" || pg_createcluster "$ver" main >/dev/null
        pg_ctlcluster "$ver" main status >/dev/null 2>&1 || pg_ctlcluster "$ver" main start -o "-c listen_addresses=127.0.0.1"
        su postgres -c "psql -qtAc \"SELECT 1 FROM pg_roles WHERE rolname='imgstore'\"" | grep -q 1 \
            || su postgres -c "psql -qc \"CREATE ROLE imgstore LOGIN SUPERUSER PASSWORD 'imgstore'\""
        export IMGSTORE_TEST_PG_URL="postgresql+psycopg://imgstore:imgstore@127.0.0.1:5432/postgres"
    fi
fi
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
