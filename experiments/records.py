"""One way for the benchmark scripts to append their results to ``docs/benchmarks.md``."""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PATH = ROOT / "docs" / "benchmarks.md"


def append_record(title: str, body: str, script: str) -> None:
    """Appends ``## title``, the exact command (``python -m experiments.<script>`` + this process's arguments) and
    ``body`` (tables, notes) to docs/benchmarks.md, creating it with its header if needed."""
    if not PATH.exists():
        PATH.write_text("# Benchmarks\n\nNumbers written by the benchmark scripts in `experiments/`; never edited by "
                        "hand.\n")
    cmd = f"python -m experiments.{script} " + " ".join(sys.argv[1:])
    with open(PATH, "a") as f:
        f.write(f"\n## {title}\n\nCommand: `{cmd.strip()}`\n\n{body.rstrip()}\n")


def stream_rows(lines: list[str], rows) -> None:
    """Appends each row (a sequence of cell strings) to ``lines`` as a table row and prints it at once, so a run cut
    by its time limit still shows what it measured."""
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
        print(lines[-1], flush=True)


def finish_table(lines: list[str], title: str, script: str, record: bool) -> None:
    """Prints the table ``lines`` and, with ``record``, appends it as ``title (date, device, jax version)``."""
    import datetime

    import jax

    table = "\n".join(lines)
    print(table)
    if record:
        dev = jax.devices()[0]
        append_record(f"{title} ({datetime.date.today().isoformat()}, {dev.device_kind}, jax {jax.__version__})",
                      table + "\n", script)
