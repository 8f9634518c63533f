#!/usr/bin/env bash
# The team stack on loopback, without Docker: infra/local.sh up|down|status|env [--help for options].
# A thin wrapper over infra/local.py (MLflow + Prefect server on PostgreSQL, a process worker).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python3}" "$here/local.py" "$@"
