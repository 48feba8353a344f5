#!/usr/bin/env bash
# Prepare a machine to test pymilterkit: system packages, then .venv with `pip install -e '.[dev,docs,metrics]'`.
#
#   bash .ci/bootstrap.sh        (or `source` it: it only defines variables and changes directory)
#
# As root it installs what is missing with apt-get (always, with `apt-get update` first, when
# CI=true); as another user it prints the exact `sudo apt-get install ...` to run and exits 1.
# Idempotent: a re-run with everything in place takes about a second.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(libmilter1.0.1 postfix miltertest opendkim opendkim-tools python3-venv
    haproxy  # tests/e2e/test_haproxy.py: Postfix -> HAProxy -> several milters (started by the test)
    libmilter-dev gcc python3-dev  # these three build pymilter (a foreign milter in tests)
    m4 libwrap0 libdb5.3 liblockfile1 libnsl2 libsasl2-2 libldap-2.5-0  # the unpacked Sendmail
    systemd)  # systemd-socket-activate and systemd-analyze (tests/integration/test_systemd.py);
              # installing it in a container is harmless: nothing starts without systemd as PID 1

# Sendmail for tests/e2e/sendmail.py. Debian's sendmail-bin conflicts with postfix (both are the
# mail-transport-agent), so it is not installed: its .debs are downloaded and unpacked with
# `dpkg-deb -x` into SENDMAIL_ROOT, no maintainer script runs, and nothing in /etc/mail exists.
SENDMAIL_ROOT=/opt/pmk-sendmail
SENDMAIL_DEBS=(sendmail-bin sendmail-cf sendmail-base)

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

unpack_sendmail() {
    [[ -x $SENDMAIL_ROOT/usr/libexec/sendmail/sendmail && -f $SENDMAIL_ROOT/usr/share/sendmail/cf/m4/cf.m4 ]] \
        && return
    if [[ "$(id -u)" != 0 ]]; then
        log "WARNING: no Sendmail in $SENDMAIL_ROOT (run this as root to unpack it); its e2e tests will fail"
        return
    fi
    local debs
    debs=$(mktemp -d)
    # (apt downloads as root here, not as _apt, into this 0700 directory: it says so, harmlessly)
    log "apt-get download ${SENDMAIL_DEBS[*]}; dpkg-deb -x into $SENDMAIL_ROOT"
    if ! (cd "$debs" && apt-get -q -o Acquire::Retries=3 download "${SENDMAIL_DEBS[@]}" >/dev/null 2>&1) \
        && ! { apt-get -q update >/dev/null && (cd "$debs" && apt-get -q download "${SENDMAIL_DEBS[@]}" >/dev/null); }; then
        log "WARNING: could not download ${SENDMAIL_DEBS[*]}; the Sendmail e2e tests will FAIL"
        rm -rf "$debs"
        return
    fi
    rm -rf "$SENDMAIL_ROOT.new"
    local deb
    for deb in "$debs"/*.deb; do
        dpkg-deb -x "$deb" "$SENDMAIL_ROOT.new"
    done
    rm -rf "$debs" "$SENDMAIL_ROOT"
    mv "$SENDMAIL_ROOT.new" "$SENDMAIL_ROOT"
}
unpack_sendmail

# --- Python environment ------------------------------------------------------------------------
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
VENV=.venv
if ! "$VENV/bin/python" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    log "creating $VENV with $(command -v python3) ($(python3 --version 2>&1))"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi

# install_project VENV EXTRAS MODULES: `pip install -e .[EXTRAS]` into VENV, only when the project
# metadata or the interpreter changed (or one of MODULES does not import).
install_project() {
    local venv=$1 extras=$2 modules=$3 stamp="$1/.pymilterkit-installed" wanted
    wanted="$(cat pyproject.toml "$venv/pyvenv.cfg" | sha256sum | cut -d' ' -f1)"
    if [[ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]] \
        || ! "$venv/bin/python" -I -c "import $modules" 2>/dev/null; then
        log "pip install -e '.[$extras]' into $venv"
        "$venv/bin/python" -m pip install -q -e ".[$extras]"
        printf '%s\n' "$wanted" >"$stamp"
    fi
}
install_project "$VENV" dev,docs,metrics "pymilterkit, pytest, mypy, mkdocs, prometheus_client"

# --- Python 3.12 and 3.13: one more venv each (.venv-3.12, .venv-3.13), `pip install -e '.[dev,metrics]'`
# Interpreters come from what the machine has: pyenv's versions, /usr/bin/python3.1x (Debian 13
# ships 3.13, Ubuntu 24.04 3.12), pythonX.Y on PATH, or `uv python find`. One that is not found
# is reported here and its `.ci/test` step fails (it never passes silently).
EXTRA_PYTHONS=(3.12 3.13)

find_python() {  # find_python X.Y: print the path of a CPython X.Y, or nothing
    local version=$1 candidate
    local -a candidates=()
    shopt -s nullglob
    candidates+=("${PYENV_ROOT:-$HOME/.pyenv}/versions/$version".*/bin/"python$version")
    shopt -u nullglob
    candidates+=("/usr/bin/python$version" "/usr/local/bin/python$version")
    command -v "python$version" >/dev/null 2>&1 && candidates+=("$(command -v "python$version")")
    command -v uv >/dev/null 2>&1 && candidates+=("$(uv python find "$version" 2>/dev/null || true)")
    for candidate in "${candidates[@]}"; do
        if [[ -n $candidate && -x $candidate ]] && "$candidate" -c \
            "import sys, venv; assert sys.version_info[:2] == tuple(map(int, '$version'.split('.')))" \
            2>/dev/null; then
            printf '%s\n' "$candidate"
            return
        fi
    done
}

for version in "${EXTRA_PYTHONS[@]}"; do
    venv=".venv-$version"
    python=$(find_python "$version")
    if [[ -z $python ]]; then
        log "WARNING: no Python $version found (pyenv, /usr/bin/python$version, PATH, uv);" \
            "the .ci/test steps for $version will FAIL"
        continue
    fi
    if [[ "$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
        != "$version" ]]; then
        log "creating $venv with $python ($("$python" --version 2>&1))"
        rm -rf "$venv"
        "$python" -m venv "$venv"
        printf '*\n' >"$venv/.gitignore"  # (3.13's venv writes this itself; 3.12's does not)
    fi
    install_project "$venv" dev,metrics "pymilterkit, pytest, mypy, prometheus_client"
done

log "ready: $("$VENV/bin/python" --version), $("$VENV/bin/python" -c 'import pymilterkit; print("pymilterkit", pymilterkit.__version__)')"
