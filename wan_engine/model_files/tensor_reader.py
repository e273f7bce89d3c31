"""Reading stored tensors onto the device from several threads at once.

MLX's CUDA loader (0.32) reads one tensor at a time on the evaluating thread: into freshly allocated host memory,
then a copy from that pageable memory to the GPU. On an H200 that is 1.4 GiB/s whichever way it is batched; the
same tensors shared among 4 threads, each evaluating its share on a stream of its own, arrive at 3.2 GiB/s
(8 threads: 3.4; bench/bench_loading.py, bench/README). It is what a later video of the low-RAM preset waits on:
the converted transformer, text encoder and VAE are read again for each video.

An MLX stream belongs to the thread that made it, and an array is evaluated on the stream it was made on, so each
reader thread opens the files itself (`mx.load` maps them lazily; nothing is read until evaluated) on its own
stream, which it keeps for the life of the process. The arrays it returns are plain evaluated arrays that any
thread may use.
"""

import queue
import threading
from pathlib import Path

import mlx.core as mx

READER_THREADS = 4  # 4: 3.2 GiB/s and 0.2 GiB more host memory at the peak; 8: 3.4 GiB/s and 0.35 GiB


class _Reader(threading.Thread):
    """A thread with a stream of its own that evaluates the tensors it is given: jobs of (index, [(file, name)],
    answers), answered by (index, arrays or the error met)."""

    def __init__(self):
        super().__init__(daemon=True, name="wan-tensor-reader")
        self.jobs = queue.Queue()

    def run(self) -> None:
        stream = mx.new_stream(mx.default_device())
        while True:
            index, share, answers = self.jobs.get()
            try:
                answers.put((index, read_share(share, stream)))
            except BaseException as error:  # raised again in the caller's thread
                answers.put((index, error))
            del share, answers  # nothing of a job stays referenced here while the thread waits for the next


def read_share(share: list, stream) -> list:
    """[(file, name)] -> their arrays, made and evaluated on `stream`."""
    files = {path: mx.load(str(path), stream=stream) for path in {path for path, _ in share}}
    arrays = [files[path][key] for path, key in share]
    mx.eval(arrays)
    return arrays


_readers: list[_Reader] = []
_readers_lock = threading.Lock()


def readers() -> list[_Reader]:
    """The reader threads, started on first use and kept for the life of the process (with their streams)."""
    with _readers_lock:
        while len(_readers) < READER_THREADS:
            _readers.append(_Reader())
            _readers[-1].start()
        return _readers


def read_tensors(tensors: dict) -> dict:
    """name -> (safetensors file, its name in that file, its bytes): the tensors read onto the default device, name
    -> evaluated mx.array. The work is shared among the reader threads, the largest tensors first, each to the
    thread with the fewest bytes so far. The first error a thread meets is raised here, once all have answered."""
    shares = [[] for _ in range(READER_THREADS)]
    loads = [0] * READER_THREADS
    for name, (path, key, nbytes) in sorted(tensors.items(), key=lambda item: -item[1][2]):
        least = loads.index(min(loads))
        shares[least].append((name, Path(path), key))
        loads[least] += nbytes
    shares = [share for share in shares if share]
    answers = queue.Queue()
    for index, (reader, share) in enumerate(zip(readers(), shares)):
        reader.jobs.put((index, [(path, key) for _, path, key in share], answers))
    read, errors = {}, []
    for _ in shares:
        index, outcome = answers.get()
        if isinstance(outcome, BaseException):
            errors.append(outcome)
        else:
            read.update(zip((name for name, _, _ in shares[index]), outcome))
    if errors:
        raise errors[0]
    return read
