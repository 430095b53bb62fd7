#!/usr/bin/env sh
# Print the path of a Python interpreter of version MAJOR.MINOR (first argument, e.g. 3.12).
# Looks at $PYTHON_<MAJOR><MINOR> (e.g. PYTHON_312), `pythonX.Y` on PATH, then pyenv's versions
# (newest patch release first). Exits 1 with a message naming what to install when none is found.
set -eu
want="${1:?usage: find-python.sh MAJOR.MINOR}"
var="PYTHON_$(echo "$want" | tr -d .)"
eval "given=\${$var:-}"
check() {
    [ -n "$1" ] && [ -x "$1" ] && "$1" -c "import sys, venv; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$want' else 1)" 2>/dev/null
}
if [ -n "$given" ]; then
    if check "$given"; then echo "$given"; exit 0; fi
    echo "find-python.sh: $var=$given is not a working Python $want interpreter" >&2
    exit 1
fi
candidate=$(command -v "python$want" 2>/dev/null || true)
if check "$candidate"; then echo "$candidate"; exit 0; fi
root=$( (pyenv root 2>/dev/null) || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for dir in $(ls -d "$root"/versions/"$want".* 2>/dev/null | sort -V -r); do
    if check "$dir/bin/python$want"; then echo "$dir/bin/python$want"; exit 0; fi
done
echo "find-python.sh: no Python $want found (looked at \$$var, python$want on PATH and $root/versions/$want.*)." >&2
echo "Install it (e.g. \`pyenv install $want\`) or set $var=/path/to/python$want." >&2
exit 1
