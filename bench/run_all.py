"""Run every benchmark in bench/ and write bench/RESULTS.md (ratios, machine, date).

    make bench            # = .venv/bin/python bench/run_all.py

Each benchmark runs as its own process (its baseline side by side with the platform path) and
prints a JSON object; the ratios and the output tail go into RESULTS.md. A benchmark that cannot run
on this machine (e.g. the 7B step without CUDA) is listed with the reason it gave.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "generate.py": "predict tokens/s, KV cache vs use_cache=False (authors' setting)",
    "ingest.py": "samples/s, Ray Data over shards vs torch DataLoader over raw JSON + images",
    "train_overhead.py": "optimizer steps/s, Ray Train + DeepSpeed (1 worker) vs bare PyTorch loop",
    "serve.py": "requests/s, @serve.batch vs max_batch_size=1, p50/p99, load drill",
    "train_step_7b.py": "7B-shaped training step on one GPU: tokens/s, peak memory, MFU",
}


def _json_objects(text: str) -> list[dict]:
    """Every JSON object printed on its own line(s) in ``text``."""
    lines, found = text.splitlines(), []
    for i, line in enumerate(lines):
        if not line.startswith("{"):
            continue
        for j in range(i, len(lines)):
            if lines[j].rstrip().endswith("}"):
                try:
                    obj = json.loads("\n".join(lines[i : j + 1]))
                except json.JSONDecodeError:
                    continue
                if isinstance(obj, dict):
                    found.append(obj)
                break
    return found


def _ratios(obj: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_ratios(value, f"{name}."))
        elif any(
            w in key for w in ("ratio", "speedup", "overhead", "per_s", "p50", "p99", "mfu", "peak")
        ):
            out[name] = value
    return out


def _machine() -> dict[str, str]:
    import torch

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "host": platform.node(),
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "memory": f"{mem:.0f} GiB",
        "gpu": gpu,
        "python / torch": f"{platform.python_version()} / {torch.__version__}",
    }


def main() -> int:
    results = []
    for script, what in BENCHMARKS.items():
        print(f"=== bench/{script}: {what}", flush=True)
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(HERE / script)], capture_output=True, text=True, cwd=HERE.parent
        )
        seconds = time.monotonic() - start
        output = proc.stdout + proc.stderr
        objects = _json_objects(proc.stdout)
        figures = _ratios(objects[-1]) if objects else {}
        print(proc.stdout[-1500:], flush=True)
        results.append((script, what, proc.returncode, seconds, figures, output))
    lines = ["# Benchmark results", "", "Written by `make bench` (bench/run_all.py).", ""]
    lines += [f"- **{k}**: {v}" for k, v in _machine().items()]
    lines += ["", "| benchmark | what | exit | wall s | figures |", "|---|---|---|---|---|"]
    for script, what, rc, seconds, figures, _ in results:
        figs = "<br>".join(f"{k} = {v}" for k, v in figures.items()) or "(see output)"
        lines.append(f"| `{script}` | {what} | {rc} | {seconds:.0f} | {figs} |")
    for script, _, rc, _, _, output in results:
        tail = "\n".join(output.strip().splitlines()[-15:])
        lines += ["", f"## {script} (exit {rc})", "", "```", tail, "```"]
    (HERE / "RESULTS.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
