#!/usr/bin/env bash
# Prepare a machine to test pymilterkit: system packages, then .venv with `pip install -e '.[dev,docs]'`.
#
#   bash .ci/bootstrap.sh        (or `source` it: it only defines variables and changes directory)
#
# As root it installs what is missing with apt-get (always, with `apt-get update` first, when
# CI=true); as another user it prints the exact `sudo apt-get install ...` to run and exits 1.
# Idempotent: a re-run with everything in place takes about a second.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(libmilter1.0.1 postfix miltertest opendkim opendkim-tools python3-venv
    libmilter-dev gcc python3-dev)  # the last three build pymilter (a foreign milter in tests)

log() { printf '[bootstrap] %s\n' "$*" >&2; }

missing_packages() {
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" != "install ok installed" ]]; then
            printf '%s\n' "$pkg"
        fi
    done
}

# True if the machine's own (default-instance) Postfix is running.
system_postfix_running() {
    [[ -x /usr/sbin/postfix && -f /etc/postfix/main.cf ]] && /usr/sbin/postfix status >/dev/null 2>&1
}

install_packages() {
    local was_running=no
    system_postfix_running && was_running=yes
    # No questions, and no mail configuration: our tests build private Postfix instances.
    printf '%s\n' \
        "postfix postfix/main_mailer_type select No configuration" \
        "postfix postfix/mailname string localhost" | debconf-set-selections
    log "apt-get update"
    apt-get -q -o Acquire::Retries=3 update >/dev/null
    log "apt-get install ${APT_PACKAGES[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Acquire::Retries=3 \
        -o DPkg::Lock::Timeout=120 install --no-install-recommends "${APT_PACKAGES[@]}" >/dev/null
    # The package may have started the system Postfix; the tests never use it, so stop it
    # again -- but only if it was not running before we came.
    if [[ $was_running == no ]] && system_postfix_running; then
        log "stopping the system Postfix the package install started"
        /usr/sbin/postfix stop >/dev/null 2>&1 || true
    fi
}

mapfile -t MISSING < <(missing_packages)
if [[ "$(id -u)" == 0 ]]; then
    if [[ "${CI:-}" == true || ${#MISSING[@]} -gt 0 ]]; then
        install_packages
    fi
elif [[ ${#MISSING[@]} -gt 0 ]]; then
    log "missing system packages: ${MISSING[*]}; install them with:"
    printf '  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends %s\n' \
        "${APT_PACKAGES[*]}" >&2
    exit 1
fi

# --- Python environment ------------------------------------------------------------------------
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
VENV=.venv
if ! "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    log "creating $VENV with $(command -v python3) ($(python3 --version 2>&1))"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi

# Reinstall only when the project metadata or the interpreter changed.
stamp="$VENV/.pymilterkit-installed"
wanted="$(cat pyproject.toml "$VENV/pyvenv.cfg" | sha256sum | cut -d' ' -f1)"
if [[ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]] \
    || ! "$VENV/bin/python" -I -c 'import pymilterkit, pytest, mypy, mkdocs' 2>/dev/null; then
    log "pip install -e '.[dev,docs]'"
    "$VENV/bin/python" -m pip install -q -e '.[dev,docs]'
    printf '%s\n' "$wanted" >"$stamp"
fi
log "ready: $("$VENV/bin/python" --version), $("$VENV/bin/python" -c 'import pymilterkit; print("pymilterkit", pymilterkit.__version__)')"
