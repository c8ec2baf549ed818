#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter (JAX 0.11 needs it), or fails loudly.
# Order: $DSJAX_PYTHON, python3.13/python3.12 on PATH, pyenv-installed 3.12/3.13, /usr/bin.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }
cands=()
[ -n "${DSJAX_PYTHON:-}" ] && cands+=("$DSJAX_PYTHON")
for v in python3.12 python3.13 python3; do
  p=$(command -v "$v" 2>/dev/null) && cands+=("$p")
done
if command -v pyenv >/dev/null 2>&1; then
  root=$(pyenv root 2>/dev/null)
  for d in "$root"/versions/3.12* "$root"/versions/3.13*; do
    [ -x "$d/bin/python3" ] && cands+=("$d/bin/python3")
  done
fi
for d in "$HOME"/.pyenv/versions/3.12* "$HOME"/.pyenv/versions/3.13* /usr/local/bin /usr/bin; do
  for n in python3.12 python3.13 python3; do [ -x "$d/bin/$n" ] && cands+=("$d/bin/$n"); [ -x "$d/$n" ] && cands+=("$d/$n"); done
done
for c in "${cands[@]}"; do
  if ok "$c"; then echo "$c"; exit 0; fi
done
echo "error: no Python >= 3.12 found (JAX 0.11 requires it). Install one or set DSJAX_PYTHON=/path/to/python3.12" >&2
exit 1
