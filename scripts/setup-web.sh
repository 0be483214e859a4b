#!/usr/bin/env bash
# Builds the dashboard (web/) into web/dist, which the aggregator serves at /.
# Idempotent: `npm ci` only when web/node_modules does not match web/package-lock.json, and a
# build only when a source file changed since the last one (a content hash in web/dist/.stamp).
# Needs Node 20+ and npm; packages come from the npm registry, pinned by package-lock.json.
set -euo pipefail
cd "$(dirname "$0")/../web"
say() { printf 'eastwest setup: %s\n' "$*"; }

if ! command -v npm >/dev/null 2>&1; then
  say "npm is missing: install Node.js 20+ (Debian: apt-get install nodejs npm) to build the dashboard"
  exit 1
fi

lock_hash=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ ! -f node_modules/.eastwest-lock ] || [ "$(cat node_modules/.eastwest-lock)" != "$lock_hash" ]; then
  say "installing the dashboard's npm packages (npm ci)"
  npm ci --no-audit --no-fund --loglevel=error
  echo "$lock_hash" > node_modules/.eastwest-lock
fi

src_hash=$( { cat package-lock.json tsconfig.json vite.config.ts index.html; find src -type f | sort | xargs cat; } | sha256sum | cut -d' ' -f1)
if [ -f dist/index.html ] && [ -f dist/.stamp ] && [ "$(cat dist/.stamp)" = "$src_hash" ]; then
  say "dashboard build up to date (web/dist)"
  exit 0
fi
say "building the dashboard into web/dist"
npm run --silent build >/dev/null
echo "$src_hash" > dist/.stamp
say "dashboard built (web/dist)"
