# Sourced by the scripts in scripts/: installs the Debian packages that
# provide missing commands.
#
#   ensure_commands redis-server:redis-server redis-cli:redis-tools ...
#
# Each argument is COMMAND:PACKAGE. As root, missing packages are installed
# with apt-get; otherwise with sudo if there is one; else the script stops,
# saying what to install.

need() { command -v "$1" >/dev/null 2>&1; }

ensure_commands() {
    local missing=() pair pkg
    for pair in "$@"; do
        pkg=${pair#*:}
        if ! need "${pair%%:*}" && [[ " ${missing[*]} " != *" $pkg "* ]]; then
            missing+=("$pkg")
        fi
    done
    ((${#missing[@]})) || return 0
    local sudo=()
    if [[ $(id -u) -ne 0 ]]; then
        if need sudo; then sudo=(sudo); else sudo=(missing); fi
    fi
    if [[ ${sudo[0]:-} == missing ]] || ! need apt-get; then
        echo "missing: ${missing[*]} — install with: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "== installing: ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
}

# ensure_packages PACKAGE... — Debian packages that provide no command of
# their own (python3-venv): installed, as above, when dpkg does not list them.
ensure_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [[ $(id -u) -ne 0 ]] && ! need sudo || ! need apt-get; then
        echo "missing: ${missing[*]} — install with: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    local sudo=()
    [[ $(id -u) -ne 0 ]] && sudo=(sudo)
    echo "== installing: ${missing[*]}" >&2
    "${sudo[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
}
