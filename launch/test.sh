#!/usr/bin/env bash
# The test command CI runs (.ci/run calls exactly this): set up `.venv` with the test extras,
# then the whole suite in it on 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS).
set -euo pipefail
cd "$(dirname "$0")/.."
# The set-up runs as a new user's would on a stock Debian/Ubuntu: a PATH of system folders
# only, so `python3` is the system interpreter (PEP 668 refuses pip into it; no `python`
# command). CI thereby proves the README's set-up. Elsewhere (no /usr/bin/python3, or one
# older than 3.11), the PATH as it is.
if [[ -x /usr/bin/python3 ]] &&
   /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  env PATH=/usr/sbin:/usr/bin:/sbin:/bin bash launch/setup.sh --test
else
  bash launch/setup.sh --test
fi
.venv/bin/python -m pytest -q -n 2 --durations=15 tests "$@"
