#!/usr/bin/env bash
# The test command CI runs (.ci/run calls exactly this): set up, then the whole suite on 8
# fake CPU devices (tests/conftest.py sets XLA_FLAGS).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
python3 -m pytest -q -n 2 --durations=15 tests "$@"
