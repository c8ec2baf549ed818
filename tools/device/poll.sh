# bash tools/device/poll.sh SECONDS [marker]: wait for the marker file (default /tmp/done), then copy /tmp results and docs/benchmarks.md to $OUT
N=${1:-500}; M=${2:-/tmp/done}
for i in $(seq 1 $N); do [ -e "$M" ] && break; sleep 1; done
[ -e "$M" ] && echo "== finished after ${i}s" || echo "== still running after ${N}s"
cp /tmp/*.txt /tmp/*.log /tmp/*.png /tmp/*.json /tmp/*.npz $OUT/ 2>/dev/null; cp docs/benchmarks.md $OUT/ 2>/dev/null
tail -c 6000 /tmp/x.log 2>/dev/null
