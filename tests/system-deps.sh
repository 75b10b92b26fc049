#!/usr/bin/env bash
# Debian packages the test suite uses: docker-compose (validates compose.yaml
# without an engine) and chromium (drives the chat page headless).
# Installs what is missing when it can (root + apt-get); otherwise says so and
# the tests that need a package skip with that reason (in CI they fail instead).
set -u
need=()
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: not root or no apt-get; missing ${need[*]} (tests needing them will skip)"
  exit 0
fi
echo "system-deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  || echo "system-deps: apt-get could not install ${need[*]}"
exit 0
