#!/usr/bin/env bash
# Regenerates tests/goldens with HF transformers 5.24 / torch 2.13 on CPU (see tools/make_goldens.py).
#
# Interpreter, in this order:
#   $DSJAX_REF_PYTHON   an existing Python that already has torch 2.13.0 + transformers 5.24.0 + safetensors + numpy
#                       (e.g. /work/venv_ref/bin/python); nothing is installed.
#   .venv-ref/          (or $DSJAX_REF_VENV) made with `python3.11 -m venv` and pip-installed on first use.
#                       accelerate is installed as well; it is only used for the report on HF's own FP8 loading.
#                       On Linux, PyPI's torch wheel pulls CUDA libraries: export
#                       PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu first for the CPU-only build.
# Extra arguments go to make_goldens.py, e.g.  tools/make_goldens.sh --cases v3 fp8
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [ -n "${DSJAX_REF_PYTHON:-}" ]; then
  py="$DSJAX_REF_PYTHON"
else
  venv="${DSJAX_REF_VENV:-$root/.venv-ref}"
  if [ ! -f "$venv/.installed" ]; then
    base="$(command -v python3.11 || true)"
    if [ -z "$base" ]; then
      echo "error: python3.11 not found; install it or set DSJAX_REF_PYTHON=/path/to/python" \
           "(with torch 2.13.0 + transformers 5.24.0 + safetensors + numpy)" >&2
      exit 1
    fi
    [ -x "$venv/bin/python" ] || "$base" -m venv "$venv"
    "$venv/bin/python" -m pip install torch==2.13.0 transformers==5.24.0 safetensors numpy accelerate
    touch "$venv/.installed"
  fi
  py="$venv/bin/python"
fi

"$py" - <<'EOF'
import sys
import torch, transformers
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
if not transformers.__version__.startswith("5.24."):
    sys.exit("error: the goldens are defined as transformers 5.24 output; this interpreter has " + transformers.__version__)
if not torch.__version__.startswith("2.13."):
    print("warning: torch " + torch.__version__ + " (goldens were made with 2.13.0); expect tiny float differences",
          file=sys.stderr)
EOF
exec "$py" tools/make_goldens.py --out tests/goldens "$@"
