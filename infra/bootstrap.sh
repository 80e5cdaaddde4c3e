#!/usr/bin/env bash
# Set up a fresh machine: system packages (apt) and the virtual environment from the lock.
# Idempotent; `make` calls it when requirements.lock or pyproject.toml change.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v java >/dev/null 2>&1 || need_apt+=(openjdk-17-jre-headless)
# The dashboard's browser test (tests/integration/test_dashboard.py) drives Debian's chromium.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium chromium-driver)
# `sluice up --cluster` mounts its object store's bucket with s3fs (FUSE) for Flink and Spark.
command -v s3fs >/dev/null 2>&1 || need_apt+=(s3fs)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "bootstrap: apt-get install ${need_apt[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# uv installs the 1.7 GB lock in under a minute (pip takes ~2 min).
command -v uv >/dev/null 2>&1 || python3 -m pip install -q uv
[ -x "$VENV/bin/python" ] || uv venv -q -p 3.11 "$VENV"
uv pip install -q -p "$VENV/bin/python" -r requirements.lock
uv pip install -q -p "$VENV/bin/python" --no-deps -e .
uv pip check -p "$VENV/bin/python"
# Every fresh venv builds pyspark's and flink-libraries' source distributions again, and uv's
# cache kept each build (~1.7 GB a run): 73 GB of them filled this machine's disk on
# 2026-12-06 and a CI run failed with "No space left on device". Prune drops what no install
# can reach any more; the newest builds stay.
uv cache prune -q
echo "bootstrap: ready ($VENV)"
