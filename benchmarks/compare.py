"""Serving comparison in one run, on one machine, with one model file and one workload:
kubellm with its defaults and with the weights dequantized in fp32 and in bf16,
llama.cpp's own C++ llama-server (parallel slots, continuous batching), and on request
a plain transformers server (one request at a time, benchmarks/hf_server.py), all on
the built-in SmolLM2-135M-Instruct GGUF.

    python benchmarks/compare.py                 # concurrency 1 4 16 64, writes results
    python benchmarks/compare.py --servers kubellm llama.cpp --concurrency 16
    python benchmarks/compare.py --base HEAD~1 --servers kubellm-base kubellm  # before/after

Writes benchmarks/results/serving.json, benchmarks/results/serving.png, prints the table,
and (with --update-benchmarks-md) rewrites the serving section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import llama_server
import serve
from launch import free_port, start
from timing import cpu_model

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "smollm2-135m-instruct"
BEGIN, END = "<!-- serving:begin -->", "<!-- serving:end -->"


# kubellm's modes: its defaults (the Q4_1 blocks kept packed, dtype auto), and the
# weights dequantized at load in fp32 (the default before) and in bf16
KUBELLM_MODES = {
    "kubellm": [],
    "kubellm-fp32": ["--quantization", "none", "--dtype", "float32"],
    "kubellm-bf16": ["--quantization", "none", "--dtype", "bfloat16"],
}


def base_install(revision: str, cache_dir: Path) -> Path:
    """kubellm as it was at `revision`, installed (without dependencies) into a folder of
    the cache that `kubellm-base` puts first on its PYTHONPATH."""
    commit = subprocess.run(
        ["git", "rev-parse", revision], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    target = cache_dir / f"kubellm-{commit[:12]}"
    if not target.exists():
        source = cache_dir / f"source-{commit[:12]}"
        source.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "archive", commit], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--target",
                str(target),
                str(source),
            ],
            check=True,
        )
    return target


def server_command(
    name: str, port: int, cache_dir: Path, slots: int, base: str | None = None
) -> list[str]:
    if name == "kubellm-base":
        if base is None:
            raise SystemExit("kubellm-base serves the commit named by --base")
        with_base = ["env", f"PYTHONPATH={base_install(base, cache_dir)}"]
        return with_base + server_command("kubellm", port, cache_dir, slots)
    if name in KUBELLM_MODES:
        return [
            sys.executable,
            "-P",
            "-m",
            "kubellm",
            "serve",
            "--port",
            str(port),
            "--served-model-name",
            MODEL_NAME,
            "--log-level",
            "warning",
            *KUBELLM_MODES[name],
        ]
    if name == "transformers":
        return [sys.executable, str(ROOT / "benchmarks" / "hf_server.py"), "--port", str(port)]
    if name == "llama.cpp":
        from kubellm.runtime.model.source import builtin_gguf_path

        binary = llama_server.build(cache_dir)
        return [
            str(binary),
            "-m",
            str(builtin_gguf_path()),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--alias",
            MODEL_NAME,
            "--parallel",
            str(slots),
            "--ctx-size",
            str(slots * 1024),
            "--threads",
            str(os.cpu_count() or 2),
            "--cont-batching",
        ]
    raise ValueError(name)


def bench_server(name: str, args: argparse.Namespace) -> list[dict]:
    port = free_port()
    log = args.out / f"{name}.log"
    command = server_command(name, port, args.cache_dir, max(args.concurrency), args.base)
    proc = start(command, port, log)
    rows = []
    try:
        url = f"http://127.0.0.1:{port}"
        fresh = name == "llama.cpp"  # its streams can break a reused keep-alive connection
        warmup = serve.synthetic(2, 99, (8, 8), (4, 4))
        asyncio.run(serve.run(url, MODEL_NAME, warmup, 2, None, 120, True, fresh))
        for concurrency in args.concurrency:
            count = max(args.min_requests, args.requests_per_slot * concurrency)
            requests = serve.synthetic(
                count, args.seed, tuple(args.prompt_words), tuple(args.output_tokens)
            )
            row = asyncio.run(
                serve.run(
                    url, MODEL_NAME, requests, concurrency, None, args.max_seconds, True, fresh
                )
            )
            row["server"] = name
            rows.append(row)
            print(serve.format_table([row]), flush=True)
        for row in rows:
            row["peak_rss_gib"] = peak_rss_gib(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return rows


def machine() -> str:
    from kubellm.kernels import cpu_library

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    kernels = cpu_library.unavailable() or f"built for {cpu_library.level()}"
    return (
        f"{os.cpu_count()} cores ({cpu_model()}; kubellm's CPU kernels {kernels}), "
        f"{memory:.0f} GiB RAM, {platform.system()}"
    )


def peak_rss_gib(pid: int) -> float:
    """A process's peak resident memory so far (Linux's VmHWM), in GiB."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 2**20  # kB


def peak_rss_line(rows: list[dict]) -> str:
    """Each server's peak RSS over its whole run, where the rows have it."""
    peaks = {r["server"]: r["peak_rss_gib"] for r in rows if "peak_rss_gib" in r}
    cells = ", ".join(f"{server} {gib:.2f} GiB" for server, gib in peaks.items())
    return f"Peak RSS of each server process over its run (VmHWM): {cells}." if peaks else ""


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (throughput, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in dict.fromkeys(r["server"] for r in rows):
        mine = [r for r in rows if r["server"] == server]
        levels = [r["concurrency"] for r in mine]
        throughput.plot(levels, [r["output_tokens_per_s"] for r in mine], marker="o", label=server)
        ttft.plot(levels, [r["ttft_s"]["p50"] for r in mine], marker="o", label=server)
    throughput.set(
        xscale="log",
        xlabel="concurrent clients",
        ylabel="output tokens/s",
        title="Throughput (higher is better)",
    )
    ttft.set(
        xscale="log",
        yscale="log",
        xlabel="concurrent clients",
        ylabel="seconds",
        title="Time to first token, p50 (lower is better)",
    )
    for axis in (throughput, ttft):
        axis.set_xticks(levels, [str(level) for level in levels])
        axis.grid(alpha=0.3)
        axis.legend()
    fig.suptitle("SmolLM2-135M-Instruct (Q4_1 GGUF) on this CPU", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(rows: list[dict], args: argparse.Namespace, when: str) -> str:
    command = "python benchmarks/compare.py --update-benchmarks-md"
    return "\n".join(
        [
            BEGIN,
            f"Measured {when} on {machine()} with `{command.strip()}` "
            f"(`make bench-serve`). Workload: seed {args.seed}, prompts of "
            f"{args.prompt_words[0]}-{args.prompt_words[1]} words, "
            f"{args.output_tokens[0]}-{args.output_tokens[1]} output tokens with ignore_eos, "
            f"max({args.min_requests}, {args.requests_per_slot} x concurrency) requests per level, "
            f"each level stopped after {args.max_seconds:.0f} s (in-flight requests are then "
            f"cancelled; their tokens so far count).",
            "",
            serve.format_table(rows),
            "",
            peak_rss_line(rows),
            "",
            "![throughput and TTFT against concurrency](benchmarks/results/serving.png)",
            END,
        ]
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--servers",
        nargs="+",
        default=[*KUBELLM_MODES, "llama.cpp"],
        help="also: transformers (one request at a time), kubellm-base (with --base)",
    )
    p.add_argument("--base", help="the commit kubellm-base serves (its defaults)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--requests-per-slot", type=int, default=3)
    p.add_argument("--min-requests", type=int, default=6)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-words", type=int, nargs=2, default=(16, 256))
    p.add_argument("--output-tokens", type=int, nargs=2, default=(32, 128))
    p.add_argument("--cache-dir", type=Path, default=ROOT / ".bench-cache")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--update-benchmarks-md", action="store_true")
    p.add_argument("--from-json", type=Path, help="re-render a saved run instead of running")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        when, rows = saved["date"], saved["rows"]
    else:
        when = datetime.date.today().isoformat()
        rows = [row for name in args.servers for row in bench_server(name, args)]
        (args.out / "serving.json").write_text(
            json.dumps({"date": when, "machine": machine(), "rows": rows}, indent=2)
        )
    plot(rows, args.out / "serving.png")
    print(serve.format_table(rows))
    print(peak_rss_line(rows))
    if args.update_benchmarks_md:
        path = ROOT / "BENCHMARKS.md"
        text = path.read_text()
        section = markdown(rows, args, when)
        if BEGIN in text:
            text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
        else:
            text += "\n## Serving: kubellm vs transformers vs llama.cpp\n\n" + section + "\n"
        path.write_text(text)


if __name__ == "__main__":
    main()
