# source tools/device/setup.sh (on the lent GPU, repo root): stop leftover jobs, install the carried wheels (.whl/), set PYTHONPATH
# (patterns anchored at the start of a command line: unanchored, they also matched the calling shell's own command
# when it named such a script, and killed the call)
pkill -f "^python3? -m experiments\." 2>/dev/null; pkill -f "^python3 \.dev/" 2>/dev/null
sleep 1
rm -f /tmp/done /tmp/done2 /tmp/done3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.used --format=csv
