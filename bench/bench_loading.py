"""Benchmark: how fast weights reach the device, and what the process holds meanwhile (issue #14's later loads and
whole-process memory).

    python3 bench/bench_loading.py --gib 5 --out /tmp/loading.json     # on the GPU machine
    python3 bench/bench_loading.py --gib 0.05 --out /tmp/loading.json  # a quick run on a CPU

It writes one safetensors file shaped like the low-RAM preset's converted transformer (per block: 8-bit packed codes,
bfloat16 scales and biases, sized as TI2V-5B's linears), reads it once so the page cache holds it (as for a later
video), then in a fresh process per way of loading reports the seconds, the GiB/s, the seconds of a first pass over
every tensor on the device (where a way leaves the weights in host-side memory, that pass moves them), and the
process's memory: its high-water mark (VmHWM), and the anonymous and file-backed parts of its resident set.
A baseline process reports the same after importing MLX, a first device op, and a matmul, a convolution, a
quantized matmul and attention (the libraries those load).
Ways: per-tensor (mx.load, one eval per tensor), grouped (one eval per GROUP_BYTES), all (one eval), numpy (the
file memory-mapped by numpy, mx.array per tensor), threads-N (N threads, each loading a share on its own stream),
host-read (each tensor read into fresh host memory by numpy, nothing sent to the device: the host side's share of a
load). A way ending in "+hugepages" runs with glibc's malloc asked for transparent huge pages (GLIBC_TUNABLES), as
MLX's CUDA loader reads each tensor into freshly malloc'ed memory whose page faults may be what it waits on.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GROUP_BYTES = 256 * 2**20
WAYS = ("per-tensor", "grouped", "all", "numpy", "threads-4")


def memory() -> dict:
    """VmHWM, VmRSS, RssAnon and RssFile of this process, in GiB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[name] = round(int(value.split()[0]) / 2**20, 3)
    return fields


def write_file(path: Path, gib: float) -> int:
    """A file of blocks of TI2V-5B's quantized linears (8-bit, group 64) until it holds `gib`; returns its bytes."""
    import mlx.core as mx

    linears = [(3072, 3072)] * 8 + [(14336, 3072), (3072, 14336)]
    tensors, size, block = {}, 0, 0
    while size < gib * 2**30:
        for i, (out, inp) in enumerate(linears):
            name = f"blocks.{block}.linear{i}"
            tensors[f"{name}.weight"] = mx.zeros((out, inp // 4), mx.uint32)
            tensors[f"{name}.scales"] = mx.ones((out, inp // 64), mx.bfloat16)
            tensors[f"{name}.biases"] = mx.zeros((out, inp // 64), mx.bfloat16)
            tensors[f"{name}.bias"] = mx.zeros((out,), mx.bfloat16)
            size += sum(tensors[f"{name}.{part}"].nbytes for part in ("weight", "scales", "biases", "bias"))
        block += 1
    mx.save_safetensors(str(path), tensors)
    return path.stat().st_size


def load_in_threads(path: Path, count: int) -> list:
    """`count` threads, each with a stream of its own on the default device, each loading every count-th tensor: on
    CUDA, MLX reads a tensor into host memory and copies it to the GPU one after another on a stream's thread, so
    several streams may overlap reads and copies (an idea for issue #14's later loads, to be measured)."""
    import threading

    import mlx.core as mx

    shares = [None] * count

    def work(i: int) -> None:
        stream = mx.new_stream(mx.default_device())  # a stream belongs to the thread that made it
        weights = mx.load(str(path), stream=stream)
        mine = list(weights.values())[i::count]
        mx.eval(mine)
        shares[i] = mine

    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(share is None for share in shares):
        raise RuntimeError("a loading thread failed")
    return [value for share in shares for value in share]


def load(way: str, path: Path) -> list:
    import mlx.core as mx
    import numpy as np

    if way.startswith("threads-"):
        return load_in_threads(path, int(way.split("-")[1]))

    if way == "host-read":
        header_length = int(np.fromfile(path, np.uint64, 1)[0])
        header = json.loads(np.fromfile(path, np.uint8, header_length, offset=8).tobytes())
        for name, entry in header.items():
            if name != "__metadata__":
                start, end = entry["data_offsets"]
                np.fromfile(path, np.uint8, end - start, offset=8 + header_length + start)
        return []
    if way == "numpy":
        header_length = int(np.fromfile(path, np.uint64, 1)[0])
        header = json.loads(np.fromfile(path, np.uint8, header_length, offset=8).tobytes())
        mapped = np.memmap(path, np.uint8, "r")
        dtypes = {"U32": np.uint32, "BF16": np.uint16}
        arrays = []
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = (8 + header_length + offset for offset in entry["data_offsets"])
            values = mx.array(mapped[start:end].view(dtypes[entry["dtype"]]).reshape(entry["shape"]))
            arrays.append(values.view(mx.bfloat16) if entry["dtype"] == "BF16" else values)
        mx.eval(arrays)
        return arrays
    weights = list(mx.load(str(path)).values())
    if way == "per-tensor":
        for value in weights:
            mx.eval(value)
    elif way == "grouped":
        group, size = [], 0
        for value in weights:
            group.append(value)
            size += value.nbytes
            if size >= GROUP_BYTES:
                mx.eval(group)
                group, size = [], 0
        mx.eval(group)
    else:
        mx.eval(weights)
    return weights


def child(way: str, path: Path) -> dict:
    """One fresh process: `way` of loading `path`, or the libraries' baseline (`way` == "baseline")."""
    import mlx.core as mx

    report = {"after_import": memory()}
    mx.eval(mx.ones((4, 4)) + 1)
    report["after_first_op"] = memory()
    if way == "baseline":
        x = mx.random.normal((256, 1024)).astype(mx.bfloat16)
        mx.eval(x @ x.T)
        report["after_matmul"] = memory()
        video = mx.random.normal((1, 4, 32, 32, 16)).astype(mx.bfloat16)
        mx.eval(mx.conv3d(video, mx.random.normal((16, 3, 3, 3, 16)).astype(mx.bfloat16)))
        report["after_conv3d"] = memory()
        w, scales, biases = mx.quantize(mx.random.normal((1024, 1024)).astype(mx.bfloat16), 64, 8)
        mx.eval(mx.quantized_matmul(x, w, scales, biases, True, 64, 8))
        report["after_quantized_matmul"] = memory()
        q = mx.random.normal((1, 24, 1024, 128)).astype(mx.bfloat16)
        mx.eval(mx.fast.scaled_dot_product_attention(q, q, q, scale=0.1))
        report["after_attention"] = memory()
        return report
    start = time.perf_counter()
    arrays = load(way.removesuffix("+hugepages"), path)
    report["load_s"] = round(time.perf_counter() - start, 3)
    report["after_load"] = memory()
    start = time.perf_counter()
    mx.eval([mx.sum(value) for value in arrays])  # every byte read once on the device
    report["first_use_s"] = round(time.perf_counter() - start, 3)
    start = time.perf_counter()
    mx.eval([mx.sum(value) for value in arrays])
    report["second_use_s"] = round(time.perf_counter() - start, 3)
    report["after_use"] = memory()
    report["mlx_active_gib"] = round(mx.get_active_memory() / 2**30, 3)
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=5.0, help="size of the test file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ways", default=",".join(("baseline", *WAYS)), help="which to run, comma-separated")
    parser.add_argument("--child", nargs=2, metavar=("WAY", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-loading-") as folder:
        path = Path(folder) / "weights.safetensors"
        size = write_file(path, args.gib)
        with open(path, "rb") as f:  # into the page cache, as a later video finds it
            while f.read(64 * 2**20):
                pass
        report = {"file_gib": round(size / 2**30, 3), "ways": {}}
        for run, way in enumerate(args.ways.split(",")):
            env = dict(os.environ)
            if way.endswith("+hugepages"):
                env["GLIBC_TUNABLES"] = "glibc.malloc.hugetlb=1"
            done = subprocess.run([sys.executable, __file__, "--out", "-", "--child", way, str(path)],
                                  capture_output=True, text=True, env=env)
            name = way if way not in report["ways"] else f"{way}-{run}"  # a way asked for twice: both kept
            if done.returncode:
                report["ways"][name] = {"error": done.stderr[-2000:]}
            else:
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if "load_s" in result:
                    result["gib_per_s"] = round(size / 2**30 / result["load_s"], 2)
                report["ways"][name] = result
            print(name, json.dumps(report["ways"][name]), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
