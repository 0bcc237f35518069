#!/usr/bin/env bash
# Runs the whole test suite: once on SQLite (embedded default), then again on PostgreSQL when one
# answers on $HELPLINE_TEST_PG (default postgresql+asyncpg://postgres@127.0.0.1:5432/test).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
.venv/bin/python -m pip install -q -e '.[dev]'
PG="${HELPLINE_TEST_PG:-postgresql+asyncpg://postgres@127.0.0.1:5432/test}"

echo "== tests on SQLite"
.venv/bin/python -m pytest -q "$@"

if .venv/bin/python - "$PG" <<'PY'
import asyncio, sys
import asyncpg
url = sys.argv[1].replace("postgresql+asyncpg://", "postgresql://")
async def main() -> None:
    conn = await asyncpg.connect(url, timeout=5)
    await conn.close()
try:
    asyncio.run(main())
except Exception as exc:
    print(f"PostgreSQL not reachable ({type(exc).__name__}): skipping the PostgreSQL run", file=sys.stderr)
    sys.exit(1)
PY
then
  echo "== tests on PostgreSQL"
  HELPLINE_TEST_DATABASE_URL="$PG" .venv/bin/python -m pytest -q "$@"
elif [ "${CI:-}" = "true" ]; then
  echo "CI needs PostgreSQL for the second run" >&2
  exit 1
fi
