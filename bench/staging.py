"""Staging throughput: quantlab's data.stage against a plain s3fs bulk get of the same files.

    python bench/staging.py [--num-files 3000] [--repeats 3]

Starts its own moto S3 server (a separate process, so that the server does not share this
process's GIL), writes an ImageFolder of `--num-files` small PNG-like blobs (2-10 KB) into a
bucket, then times, interleaved and repeated, each into a fresh local folder:

  quantlab  quantlab.data.stage(uri, cache): one recursive listing, fingerprint, concurrent
            download, verification of counts and sizes, the staging marker
  s3fs      s3fs.S3FileSystem().get(prefix, folder, recursive=True): s3fs's own bulk get
            (it lists the prefix too), with s3fs's defaults

and prints files/s, MB/s and client CPU per file of each (medians over repeats) and the
throughput ratio quantlab / s3fs. Both use the same S3FileSystem instance (s3fs's defaults: a
pool of 10 connections). Timings on a shared machine are noisy; the ratio is what to read,
measured side by side. moto is a single Python process, so it bounds both contenders' speed;
the client CPU per file shows what each costs on the client side, where a fast server
(AWS, MinIO) would leave the difference.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start")


def make_files(num_files: int, num_classes: int, seed: int) -> dict[str, bytes]:
    """An ImageFolder (80% train, 20% val) of PNG-like blobs of 2-10 KB."""
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(num_files):
        split = "val" if i % 5 == 0 else "train"
        size = int(rng.integers(2048, 10240))
        body = rng.integers(0, 256, size - len(PNG_SIGNATURE), dtype=np.uint8).tobytes()
        files[f"{split}/class{i // 5 % num_classes:03d}/{i:07d}.png"] = PNG_SIGNATURE + body
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-files", type=int, default=3000)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    os.environ.pop("QUANTLAB_STORAGE_OPTIONS", None)
    import s3fs

    from quantlab import data

    server = start_moto(port)
    tmp = tempfile.mkdtemp(prefix="quantlab-bench-staging-")
    try:
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        files = make_files(args.num_files, args.num_classes, args.seed)
        prefix = "bench/datasets/blobs"
        fs.pipe({f"{prefix}/{rel}": body for rel, body in files.items()})
        num_bytes = sum(len(b) for b in files.values())
        print(f"{len(files)} files, {num_bytes / 1e6:.1f} MB ({num_bytes / len(files) / 1e3:.1f} KB "
              f"mean) in s3://{prefix} on moto at {endpoint}")

        def quantlab_stage(dest: str) -> None:
            staged = data.stage(f"s3://{prefix}", dest)
            assert staged.staged_files == len(files), staged

        def s3fs_get(dest: str) -> None:
            s3fs.S3FileSystem().get(f"{prefix}/", dest + "/", recursive=True)
            assert sum(len(n) for _, _, n in os.walk(dest)) == len(files)

        contenders = [("quantlab", quantlab_stage), ("s3fs", s3fs_get)]
        seconds: dict[str, list[float]] = {name: [] for name, _ in contenders}
        cpu: dict[str, list[float]] = {name: [] for name, _ in contenders}
        for r in range(args.repeats):
            for name, fn in contenders if r % 2 == 0 else contenders[::-1]:
                dest = os.path.join(tmp, f"{name}-{r}")
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(dest)
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)  # this process, all threads
                shutil.rmtree(dest)
                print(f"  repeat {r + 1}: {name:<8} {seconds[name][-1]:6.2f} s "
                      f"(client CPU {cpu[name][-1]:5.2f} s)")

        print(f"\n{'':<10}{'files/s':>10}{'MB/s':>8}{'seconds':>9}{'client CPU ms/file':>20}"
              "   (medians)")
        median = {name: statistics.median(s) for name, s in seconds.items()}
        for name, s in median.items():
            cpu_ms = statistics.median(cpu[name]) * 1e3 / len(files)
            print(f"{name:<10}{len(files) / s:>10.0f}{num_bytes / 1e6 / s:>8.2f}{s:>9.2f}"
                  f"{cpu_ms:>20.2f}")
        print(f"ratio quantlab / s3fs (throughput): {median['s3fs'] / median['quantlab']:.2f} "
              f"(target >= 0.80)")
        print("reproduce: "
              + shlex.join(["python", "bench/staging.py", *sys.argv[1:]]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
