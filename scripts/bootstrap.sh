#!/usr/bin/env bash
# Set-up shared by scripts/demo and scripts/test: Debian packages, then the project's venv.
# Idempotent: a second run installs nothing. Usage: source it, or run it with a list of
# extra Debian packages ("mosquitto" is always needed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "bootstrap: installing Debian packages: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
    # Debian starts mosquitto on port 1883 where systemd runs; the project starts its own.
}

# Packages whose Debian scripts start a system service we never use (rabbitmq-server: a node
# on 5672 and epmd on 4369, all interfaces): installed without starting it. policy-rc.d's
# 101 ("not allowed") stops invoke-rc.d and deb-systemd-invoke for the install (unless the
# machine has a policy already, as containers do), and where systemd runs, what we
# installed is disabled too, so a reboot does not start it either.
apt_install_no_start() {
    local policy=/usr/sbin/policy-rc.d added="" missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod 755 "$policy"
        added=1
    fi
    apt_install "${missing[@]}" || { [ -z "$added" ] || $sudo rm -f "$policy"; return 1; }
    [ -z "$added" ] || $sudo rm -f "$policy"
    if [ -d /run/systemd/system ]; then
        $sudo systemctl disable --now "${missing[@]}" >/dev/null 2>&1 || true
    fi
}

find_python() {
    for py in python3.11 python3.12 python3.13 python3; do
        if command -v "$py" >/dev/null 2>&1 &&
            "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$py"
            return 0
        fi
    done
    echo "bootstrap: Python 3.11 or newer is required (apt-get install python3)" >&2
    return 1
}

# DTLSSocket (coaps; in the `dtls` extra, which `test` includes) ships no wheels: pip builds
# it from source, running tinydtls' autogen.sh (autoconf, automake, libtool) and a C
# compiler against the venv's Python headers. ~10 s on 2 cores.
dtls_build_deps() {
    apt_install autoconf automake libtool gcc libc6-dev make
    local include
    include="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
    [ -f "$include/Python.h" ] || apt_install python3-dev
}

make_venv() {
    local extras="$1"
    local stamp="$VENV/.installed-$extras"
    if [ ! -x "$VENV/bin/python" ]; then
        local py
        py="$(find_python)"
        if ! "$py" -m venv --help >/dev/null 2>&1 || ! "$py" -c 'import ensurepip' 2>/dev/null; then
            apt_install python3-venv
        fi
        echo "bootstrap: creating $VENV" >&2
        "$py" -m venv "$VENV"
    fi
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo "bootstrap: installing the project into $VENV" >&2
        case ",$extras," in *,test,* | *,dtls,*) dtls_build_deps ;; esac
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[$extras]"
        touch "$stamp"
    fi
}

# npm peers for the interop tests, in $ROOT/.node (never global): lwm2m-node-lib, a real
# third-party LwM2M 1.0 client (tests/test_lwm2m_interop.py). Node from Debian (nodejs,
# npm) unless the machine has one; a second run installs nothing.
NODE_PEERS=("lwm2m-node-lib@1")
npm_peers() {
    command -v node >/dev/null 2>&1 || apt_install nodejs
    command -v npm >/dev/null 2>&1 || apt_install npm
    local stamp="$ROOT/.node/.installed-${NODE_PEERS[*]// /,}"
    [ -f "$stamp" ] && return 0
    echo "bootstrap: installing npm peers into $ROOT/.node: ${NODE_PEERS[*]}" >&2
    mkdir -p "$ROOT/.node"
    npm install --prefix "$ROOT/.node" --no-audit --no-fund --no-save --loglevel=error \
        "${NODE_PEERS[@]}" >/dev/null
    touch "$stamp"
}
