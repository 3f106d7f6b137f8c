# Sourced by the scripts in scripts/ (after deps.sh): the project-local Python
# virtual environment `.venv` at the repository root, with the packages pinned
# in scripts/requirements.txt. Nothing is installed into the system Python.
#
#   ensure_venv        # creates/updates .venv; sets VENV_PYTHON
#
# Debian's python3 needs python3-venv (ensurepip) for `python3 -m venv`; it is
# installed with apt-get when missing, as deps.sh installs commands. The
# packages are installed again whenever requirements.txt differs from the copy
# kept in .venv after the last successful install.

VENV_DIR=${NEARCACHE_VENV:-$PWD/.venv}   # NEARCACHE_VENV: another place
VENV_PYTHON=$VENV_DIR/bin/python

ensure_venv() {
    local req=scripts/requirements.txt stamp=$VENV_DIR/.requirements.txt
    if [[ ! -x $VENV_PYTHON ]] || ! "$VENV_PYTHON" -m pip --version >/dev/null 2>&1; then
        echo "== creating the project's Python environment (python3 -m venv .venv)"
        rm -rf "$VENV_DIR"
        # Debian's python3 without python3-venv has no ensurepip wheels: the
        # first try fails, then the package is installed and it is tried again.
        if ! python3 -m venv "$VENV_DIR" >/dev/null 2>&1; then
            rm -rf "$VENV_DIR"
            ensure_packages python3-venv
            python3 -m venv "$VENV_DIR" || {
                echo "could not create $VENV_DIR: apt-get install -y python3-venv" >&2; exit 1; }
        fi
    fi
    if ! cmp -s "$req" "$stamp"; then
        echo "== installing Python packages into .venv (pip install -r $req)"
        "$VENV_PYTHON" -m pip install -q --disable-pip-version-check -r "$req" || {
            echo "could not install Python packages: $VENV_PYTHON -m pip install -r $req" >&2; exit 1; }
        cp "$req" "$stamp"
    fi
}
