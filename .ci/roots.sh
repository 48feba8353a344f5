# Throwaway Debian roots for CI, sourced by .ci/run (root only; needs Debian's debootstrap).
#
#   root_ready SUITE          build the root of SUITE (trixie, testing, bookworm, ...) unless a
#                             good one is cached; prints its directory
#   root_run SUITE COMMAND... run COMMAND (a bash -c string) inside the root, as a new user would:
#                             /proc, /sys, /dev, /dev/pts, a tmpfs /tmp and /dev/shm mounted for
#                             the run only (in a mount namespace of its own, and unmounted by a
#                             trap), the host's registry settings refreshed first
#
# A root is `debootstrap --variant=minbase` plus what the README tells a new user to install first
# (ROOT_PACKAGES), nothing else. It is cached in ROOTS_DIR between runs on one machine and built
# again when missing, broken (a half-made one, an interpreter that does not start) or made by
# another version of this recipe. The roots reach the package registries exactly as the host
# does: its Debian mirror and apt settings, CA bundle (the host may intercept TLS), pip
# configuration (files and PIP_* variables) and the local directories that configuration names.

ROOTS_DIR=${PMK_ROOTS_DIR:-/var/cache/pymilterkit-roots}
ROOT_PACKAGES=(git ca-certificates)  # README "Two commands": what a new user installs first

_roots_log() { printf '[roots] %s\n' "$*" >&2; }

# The host's Debian archive (and security archive) as apt reaches them, from its apt lists.
_host_uri() {  # _host_uri main|security
    local codename uri release
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    while read -r uri release; do
        if [[ $1 == security && $release == *-security ]] \
            || [[ $1 == main && $release == "$codename" ]]; then
            printf '%s\n' "${uri%/}"
            return
        fi
    done < <(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null | sort -u)
    [[ $1 == main ]] && printf 'http://deb.debian.org/debian\n'
    [[ $1 == security ]] && printf 'http://deb.debian.org/debian-security\n'
}

# Local directories and files the host's pip settings name (find-links, file:// indexes --
# the directory above a .../simple index, where its files are --, constraint and cert files),
# one a line.
_pip_paths() {
    local python value
    python=$(command -v python3 || true)
    {
        [[ -n $python ]] && "$python" -m pip config list 2>/dev/null | sed -E "s/^[^=]*=//; s/^'//; s/'$//"
        env | sed -n -E 's/^PIP_[A-Z_]+=//p'
    } | tr ' ' '\n' | while read -r value; do
        value=${value#file://}
        value=${value%/}
        [[ $value == */simple ]] && value=${value%/simple}  # an index: its files lie beside
        [[ $value == /* && -e $value ]] && printf '%s\n' "$value"
    done | sort -u
}

# Copy the host's registry settings into the root (at build and before every run).
_copy_host_settings() {
    local dir=$1 suite=$2 main security f
    main=$(_host_uri main)
    security=$(_host_uri security)
    rm -f "$dir/etc/apt/sources.list"
    mkdir -p "$dir/etc/apt/sources.list.d" "$dir/etc/apt/apt.conf.d"
    {
        printf 'Types: deb\nURIs: %s\nSuites: %s' "$main" "$suite"
        [[ $suite != testing && $suite != unstable && $suite != sid ]] && printf ' %s-updates' "$suite"
        printf '\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        if [[ $suite != testing && $suite != unstable && $suite != sid ]]; then
            printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' "$security" "$suite"
            printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        fi
    } >"$dir/etc/apt/sources.list.d/debian.sources"
    # apt settings on how to reach the archive (proxies, retries, validity checks)
    for f in /etc/apt/apt.conf /etc/apt/apt.conf.d/*; do
        [[ -f $f ]] && grep -q 'Acquire' "$f" && cp "$f" "$dir/etc/apt/apt.conf.d/host-$(basename "$f")"
    done
    [[ -d /etc/apt/auth.conf.d ]] && cp -a /etc/apt/auth.conf.d/. "$dir/etc/apt/auth.conf.d/"
    cp /etc/resolv.conf "$dir/etc/resolv.conf" 2>/dev/null || true
    # The CA bundle, and the host's own CAs where update-ca-certificates keeps them if
    # ca-certificates is (re)installed in the root.
    mkdir -p "$dir/etc/ssl/certs" "$dir/usr/local/share/ca-certificates"
    local bundle=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
    [[ -f $bundle ]] && cp -L "$bundle" "$dir/etc/ssl/certs/ca-certificates.crt"
    [[ -d /usr/local/share/ca-certificates ]] \
        && cp -a /usr/local/share/ca-certificates/. "$dir/usr/local/share/ca-certificates/"
    # pip: its configuration files; the files they name are copied (directories are mounted)
    for f in /etc/pip.conf /root/.pip/pip.conf /root/.config/pip/pip.conf; do
        [[ -f $f ]] && mkdir -p "$dir$(dirname "$f")" && cp "$f" "$dir$f"
    done
    [[ -d /etc/xdg/pip ]] && mkdir -p "$dir/etc/xdg" && rm -rf "$dir/etc/xdg/pip" \
        && cp -a /etc/xdg/pip "$dir/etc/xdg/pip"
    while read -r f; do
        [[ -f $f ]] && mkdir -p "$dir$(dirname "$f")" && cp "$f" "$dir$f"
    done < <(_pip_paths)
    return 0
}

# What a root is made of; a root made otherwise is built again. (Bump the number when the way
# it is built changes.)
_recipe() { printf 'debootstrap --variant=minbase, then %s (1)\n' "${ROOT_PACKAGES[*]}"; }

_root_ok() {  # _root_ok DIR: built by this recipe, and its tools start
    [[ "$(cat "$1/.pymilterkit-root" 2>/dev/null)" == "$(_recipe)" ]] \
        && chroot "$1" /usr/bin/env -i /bin/sh -c 'git --version && dpkg --audit' >/dev/null 2>&1
}

# root_ready SUITE: print the directory of a good root of SUITE, building it when needed.
root_ready() {
    local suite=$1 dir="$ROOTS_DIR/$1" script=""
    if _root_ok "$dir"; then
        printf '%s\n' "$dir"
        return
    fi
    command -v debootstrap >/dev/null || {
        _roots_log "apt-get install debootstrap"
        apt-get -q -o Acquire::Retries=3 update >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get -q -y install --no-install-recommends debootstrap >/dev/null
    }
    # This host's debootstrap may not know the current testing codename: use its sid script.
    [[ -e /usr/share/debootstrap/scripts/$suite ]] || script=/usr/share/debootstrap/scripts/sid
    _roots_log "building $dir: debootstrap --variant=minbase $suite (then ${ROOT_PACKAGES[*]})"
    rm -rf "$dir" "$dir.new"
    mkdir -p "$ROOTS_DIR"
    local proxy
    proxy=$(apt-config shell p Acquire::http::Proxy | sed -E "s/^p='(.*)'$/\1/")
    http_proxy=${proxy:-${http_proxy:-}} debootstrap --variant=minbase "$suite" "$dir.new" \
        "$(_host_uri main)" $script >"$ROOTS_DIR/$suite.debootstrap.log" 2>&1 || {
        _roots_log "debootstrap $suite failed: $(tail -3 "$ROOTS_DIR/$suite.debootstrap.log")"
        return 1
    }
    _copy_host_settings "$dir.new" "$suite"
    _in_root "$dir.new" "apt-get -q -o Acquire::Retries=3 update >/dev/null && \
        DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Acquire::Retries=3 install \
        --no-install-recommends ${ROOT_PACKAGES[*]} >/dev/null && apt-get clean" || return 1
    _recipe >"$dir.new/.pymilterkit-root"
    mv "$dir.new" "$dir"
    printf '%s\n' "$dir"
}

# _in_root DIR COMMAND: COMMAND (bash -c) in DIR with the mounts, in a mount namespace of its
# own; processes it leaves behind are ended (by PID) and everything is unmounted on the way out.
_in_root() {
    local dir=$1 command=$2 mounts=""
    local -a paths=()
    mapfile -t paths < <(_pip_paths)
    local p
    for p in "${paths[@]}"; do
        [[ -d $p ]] && mounts+="mkdir -p '$dir$p' && mount --bind -o ro '$p' '$dir$p' && "
    done
    unshare --mount --propagation private -- /bin/bash -c '
        set -u
        dir=$1; command=$2
        cleanup() {
            local pid
            for pid in $(ls /proc | grep -E "^[0-9]+$"); do
                [[ $pid != $$ && "$(readlink /proc/$pid/root 2>/dev/null)" == "$dir" ]] \
                    && kill -9 "$pid" 2>/dev/null
            done
            sleep 0.2
            for m in dev/shm dev/pts dev tmp sys proc; do umount -l "$dir/$m" 2>/dev/null; done
            grep -o " $dir/[^ ]*" /proc/self/mounts | sort -r | while read -r m; do umount -l "$m"; done
        }
        trap cleanup EXIT
        mount -t proc proc "$dir/proc" && mount -t sysfs sys "$dir/sys" \
            && mount --bind /dev "$dir/dev" && mount --bind /dev/pts "$dir/dev/pts" \
            && mount -t tmpfs -o mode=1777 tmpfs "$dir/dev/shm" \
            && mount -t tmpfs -o mode=1777 tmpfs "$dir/tmp" && '"$mounts"' true || exit 1
        mapfile -t passed < <(env | grep -E \
            "^(PIP_[A-Z_]+|PMK_[A-Z_]+|CI|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE|CURL_CA_BUNDLE)=")
        chroot "$dir" /usr/bin/env -i HOME=/root TERM="${TERM:-dumb}" LANG=C.UTF-8 \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            "${passed[@]}" /bin/bash -c "$command"
    ' _ "$dir" "$command"
}

# root_run SUITE COMMAND: COMMAND in the (ready) root of SUITE, settings refreshed first.
root_run() {
    local dir="$ROOTS_DIR/$1"
    _copy_host_settings "$dir" "$1"
    _in_root "$dir" "$2"
}
