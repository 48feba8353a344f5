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
    m4  # the unpacked Sendmail's cf build
    procps  # `kill`, which the shipped unit's ExecReload runs (systemd-analyze verify checks it)
    systemd)  # systemd-socket-activate and systemd-analyze (tests/integration/test_systemd.py);
              # installing it in a container is harmless: nothing starts without systemd as PID 1
# The libraries the unpacked Sendmail links with are not named here: their names change between
# Debian releases (libldap-2.5-0 -> libldap2, libdb5.3 -> libdb5.3t64, libnsl2 -> libnsl3), so
# they are what apt says sendmail-bin depends on (`apt-cache depends`), and they count as
# installed when the unpacked sendmail finds every library it needs (ldd), whatever their names.

# Sendmail for tests/e2e/sendmail.py. Debian's sendmail-bin conflicts with postfix (both are the
# mail-transport-agent), so it is not installed: its .debs are downloaded and unpacked with
# `dpkg-deb -x` into SENDMAIL_ROOT, no maintainer script runs, and nothing in /etc/mail exists.
SENDMAIL_ROOT=/opt/pmk-sendmail
SENDMAIL_DEBS=(sendmail-bin sendmail-cf sendmail-base)

log() { printf '[bootstrap] %s\n' "$*" >&2; }

installed() {  # installed PKG: dpkg has PKG installed
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" == "install ok installed" ]]
}

SENDMAIL_BINARY=$SENDMAIL_ROOT/usr/libexec/sendmail/sendmail

sendmail_libraries_present() {  # the unpacked sendmail is there and finds all its libraries
    [[ -x $SENDMAIL_BINARY ]] && ! ldd "$SENDMAIL_BINARY" 2>&1 | grep -q 'not found'
}

missing_packages() {  # one line each: a package not installed
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        installed "$pkg" || printf '%s\n' "$pkg"
    done
    sendmail_libraries_present || printf '%s\n' "(the libraries sendmail-bin depends on)"
}

# What to install: APT_PACKAGES, and the libraries sendmail-bin depends on in the release apt
# offers (asked after `apt-get update`; real packages only, not virtual ones).
install_list() {
    printf '%s\n' "${APT_PACKAGES[@]}"
    apt-cache depends sendmail-bin 2>/dev/null | sed -n 's/^ *Depends: \(lib[^ <>]*\)$/\1/p'
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
    local -a wanted
    mapfile -t wanted < <(install_list)
    if [[ ${#wanted[@]} == "${#APT_PACKAGES[@]}" ]]; then
        log "apt knows no sendmail-bin: its libraries cannot be chosen"
        exit 1
    fi
    log "apt-get install ${wanted[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Acquire::Retries=3 \
        -o DPkg::Lock::Timeout=120 install --no-install-recommends "${wanted[@]}" >/dev/null
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
    mapfile -t WANTED < <(install_list 2>/dev/null)
    log "missing system packages: ${MISSING[*]}; install them with:"
    printf '  sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends %s\n' \
        "${WANTED[*]}" >&2
    exit 1
fi

unpack_sendmail() {
    [[ -x $SENDMAIL_BINARY && -f $SENDMAIL_ROOT/usr/share/sendmail/cf/m4/cf.m4 ]] \
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

# --- Python environments -----------------------------------------------------------------------
# .venv: the machine's python3, `pip install -e '.[dev,docs,metrics]'` (the whole .ci/test runs
# there). .venv-X.Y: each other supported Python the machine has, `pip install -e
# '.[dev,metrics]'` (the unit and integration suites run there). pymilter (the `pymilter` extra)
# is added to each where it builds; where it does not, the reason is written to
# VENV/pymilter-unbuildable and the tests that need it are skipped with it.
SUPPORTED_PYTHONS=(3.11 3.12 3.13 3.14)
TRIED_PYTHONS=(3.15)  # tested where present, not required
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# install_project VENV EXTRAS MODULES: `pip install -e .[EXTRAS]` into VENV, only when the project
# metadata or the interpreter changed (or one of MODULES does not import), then pymilter.
install_project() {
    local venv=$1 extras=$2 modules=$3 stamp="$1/.pymilterkit-installed" wanted
    wanted="$(cat pyproject.toml "$venv/pyvenv.cfg" | sha256sum | cut -d' ' -f1)"
    if [[ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]] \
        || ! "$venv/bin/python" -I -c "import $modules" 2>/dev/null; then
        log "pip install -e '.[$extras]' into $venv"
        "$venv/bin/python" -m pip install -q -e ".[$extras]"
        rm -f "$venv/pymilter-unbuildable"
        if ! "$venv/bin/python" -m pip install -q -e ".[pymilter]" >"$venv/pymilter-build.log" 2>&1; then
            local why
            why=$(grep -m1 -E 'error:' "$venv/pymilter-build.log" | sed -E 's/^ +//' || true)
            printf '%s (%s; pip install -e .[pymilter] in %s, log: %s)\n' "${why:-pip failed}" \
                "$(gcc --version 2>/dev/null | head -1)" "$venv" "$venv/pymilter-build.log" \
                >"$venv/pymilter-unbuildable"
            log "WARNING: pymilter does not build for $venv: ${why:-see $venv/pymilter-build.log};" \
                "its tests will be skipped there"
        fi
        printf '%s\n' "$wanted" >"$stamp"
    fi
}

python_version() { "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null; }

find_python() {  # find_python X.Y: print the path of a CPython X.Y that can make a venv, or nothing
    local version=$1 candidate
    local -a candidates=()
    shopt -s nullglob
    candidates+=("${PYENV_ROOT:-$HOME/.pyenv}/versions/$version".*/bin/"python$version")
    shopt -u nullglob
    candidates+=("/usr/bin/python$version" "/usr/local/bin/python$version")
    command -v "python$version" >/dev/null 2>&1 && candidates+=("$(command -v "python$version")")
    command -v uv >/dev/null 2>&1 && candidates+=("$(uv python find "$version" 2>/dev/null || true)")
    for candidate in "${candidates[@]}"; do
        # (Debian's pythonX.Y has venv but no ensurepip without its pythonX.Y-venv package)
        if [[ -n $candidate && -x $candidate && "$(python_version "$candidate")" == "$version" ]] \
            && "$candidate" -c 'import ensurepip, venv' 2>/dev/null; then
            printf '%s\n' "$candidate"
            return
        fi
    done
}

VENV=.venv
main_version=$(python_version python3)
if [[ "$(python_version "$VENV/bin/python")" != "$main_version" ]]; then
    log "creating $VENV with $(command -v python3) ($(python3 --version 2>&1))"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
fi
install_project "$VENV" dev,docs,metrics "pymilterkit, pytest, mypy, mkdocs, prometheus_client"

# PMK_SKIP_PYTHONS: versions not to set up here (.ci/run tests them in a Debian root instead).
found=("$main_version (.venv)")
not_found=()
for version in "${SUPPORTED_PYTHONS[@]}" "${TRIED_PYTHONS[@]}"; do
    [[ $version == "$main_version" || " ${PMK_SKIP_PYTHONS:-} " == *" $version "* ]] && continue
    venv=".venv-$version"
    python=$(find_python "$version")
    if [[ -z $python ]]; then
        not_found+=("$version")
        rm -rf "$venv"
        continue
    fi
    if [[ "$(python_version "$venv/bin/python")" != "$version" ]]; then
        log "creating $venv with $python ($("$python" --version 2>&1))"
        rm -rf "$venv"
        "$python" -m venv "$venv"
        printf '*\n' >"$venv/.gitignore"  # (3.13's venv writes this itself; 3.12's does not)
    fi
    install_project "$venv" dev,metrics "pymilterkit, pytest, mypy, prometheus_client"
    found+=("$version ($venv)")
done

log "Pythons found: ${found[*]}; not found: ${not_found[*]:-none}" \
    "(looked in pyenv, /usr/bin, /usr/local/bin, PATH, uv)"
log "ready: $("$VENV/bin/python" --version), $("$VENV/bin/python" -c 'import pymilterkit; print("pymilterkit", pymilterkit.__version__)')"
