"""The process the fuzz tests (`test_fuzz.py`) load damaged files in, so that a crash, a hang or a huge
allocation is seen from outside and costs one case, not the test run.

`Worker` starts `python fuzz_worker.py FD`, which imports the package once, caps its own address space
(`resource.RLIMIT_AS`: what the imports took plus `HEADROOM`, so that an allocation of a size no small
file holds fails) and answers requests `(reader, path, options)` on the socket FD, one at a time:
`("ok", what was read)`, `("error", exception type, whether it is a CheckpointError, message)`, or
`("allocation", ...)` for an error that is or was raised from a MemoryError (a loader may wrap it). The
readers are the loaders' entry points, from the cheapest that still parses a whole file (a weights
file's header and every tensor) to `StableDiffusion.from_checkpoint`; "reference" reads a weights file
with the reference readers (the `safetensors` library, `torch.load(weights_only=True)`).
"""
import hashlib
import os
import resource
import socket
import subprocess
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

HEADROOM = 3 << 30  # bytes of address space beyond the imports'; the fuzzed files are a few MB
PROMPT = "a photo of an astronaut riding a horse"


def digest(arrays):
    """{key: (dtype, shape, sha1 of the bytes)} of numpy arrays."""
    import numpy as np

    arrays = {key: np.ascontiguousarray(array) for key, array in arrays.items()}
    return {key: (a.dtype.str, a.shape, hashlib.sha1(a.view(np.uint8).data).hexdigest()) for key, a in arrays.items()}


def read_single(path, options):
    """An original single file (a VAE file with `vae`): every tensor, then the plan of its models
    (`checkpoints.read` but for the vendored tokenizer, which takes longer than the rest)."""
    from stable_diffusion import ldm

    tensors, _ = ldm.open_single_file(path)
    read = digest({key: tensors[key] for key in tensors})
    (ldm.standalone_vae_plan if options.get("vae") else ldm.plan)(tensors.shapes, path)
    return read


def read_weights(path, options):
    """A diffusers component's safetensors file (a bundle's with `bundle`): its header, then every tensor."""
    from stable_diffusion import bundle, weights

    tensors = bundle.open_weights(path) if options.get("bundle") else weights.Tensors.from_safetensors([path])
    return digest({key: tensors[key] for key in tensors})


def read_reference(path, options):
    """The `digest` of a weights file as the reference reader gives it, `state_dict` nesting removed, the
    bundle's padding (with `bundle`) left out; None where the reference reader refuses the file."""
    import torch
    from safetensors.torch import load_file
    from stable_diffusion import bundle

    try:
        if path.suffix == ".safetensors":
            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
            while isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
                data = data["state_dict"]
    except Exception:
        return None
    skip = bundle.PADDING if options.get("bundle") else ()
    return digest({key: (value.float() if value.dtype == torch.bfloat16 else value).numpy()
                   for key, value in data.items() if isinstance(value, torch.Tensor) and not key.startswith(skip)})


def read_checkpoint(path, options):
    """`checkpoints.read` of a folder: its configs, tokenizer and weights headers, no model built."""
    from stable_diffusion import checkpoints

    found = checkpoints.read(path, **options)
    return repr((found.config, found.img_height, found.img_width))


def read_tokenizer(path, options):
    """A tokenizer folder, then a prompt tokenized."""
    from stable_diffusion.tokenizer import Tokenizer

    return Tokenizer.from_folder(path)(PROMPT).tolist()


def read_pipeline(path, options):
    """The public path: `StableDiffusion.from_checkpoint`, every model built and every weight assigned."""
    from stable_diffusion import StableDiffusion

    return StableDiffusion.from_checkpoint(path, jit_compile=False, **options).tokenize(PROMPT).tolist()


READERS = {"single": read_single, "weights": read_weights, "reference": read_reference,
           "checkpoint": read_checkpoint, "tokenizer": read_tokenizer, "pipeline": read_pipeline}


def serve(fd):
    """Answers requests on the socket `fd` until it closes."""
    import safetensors.torch  # the reference readers, imported before the address space is capped
    import torch
    from stable_diffusion import StableDiffusion
    from stable_diffusion.weights import CheckpointError

    with open("/proc/self/statm") as statm:
        used = int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (used + HEADROOM, resource.RLIM_INFINITY))
    connection = Connection(fd)
    connection.send("ready")
    while True:
        try:
            reader, path, options = connection.recv()
        except EOFError:
            return
        try:
            result = ("ok", READERS[reader](Path(path), options))
        except Exception as error:  # the test judges it
            result = ("error", f"{type(error).__module__}.{type(error).__qualname__}",
                      isinstance(error, CheckpointError), str(error))
            if any(isinstance(cause, MemoryError) for cause in causes(error)):
                result = ("allocation", *result[1:])
        connection.send(result)


def causes(error):
    """`error` and the exceptions it was raised from or while handling."""
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


class Worker:
    """The parent's side: `run(reader, path, **options)` -> the worker's answer, ("crash", exit status,
    output) if it died, or ("hang", seconds) past `timeout`; a worker that crashed or hung is replaced.
    An "allocation", "crash" or "hang" from a worker that served earlier requests is asked again of a fresh
    worker, given three times as long, whose answer stands: in a long run, the requests before can leave the
    capped address space too fragmented for an allocation any fresh worker makes (a MemoryError, or an abort
    where the allocator is Rust's), and a loaded machine can make a request outlast `timeout`. The worker
    works in the folder `cwd`."""

    def __init__(self, timeout=10.0, cwd=None):
        self.timeout, self.cwd, self.process = timeout, cwd, None

    def start(self):
        ours, theirs = socket.socketpair()
        self.log = tempfile.TemporaryFile()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(os.path.abspath, sys.path)), TF_CPP_MIN_LOG_LEVEL="3",
                   MALLOC_ARENA_MAX="2")  # few malloc arenas: threads reserve less of the capped address space
        self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=self.log,
                                        stderr=self.log, env=env, cwd=self.cwd)
        theirs.close()
        self.connection = Connection(ours.detach())
        if not self.connection.poll(300) or self.connection.recv() != "ready":
            raise RuntimeError(f"the fuzz worker did not start: {self.output()}")

    def output(self):
        """The end of what the worker wrote to stdout and stderr."""
        self.log.seek(0)
        return self.log.read()[-2000:].decode(errors="replace")

    def run(self, reader, path, **options):
        fresh = self.process is None
        result = self.ask(reader, path, options, self.timeout)
        if result[0] in ("allocation", "crash", "hang") and not fresh:
            self.stop()
            result = self.ask(reader, path, options, 3 * self.timeout)
        return result

    def ask(self, reader, path, options, timeout):
        """One request to the running worker, started if need be."""
        if self.process is None:
            self.start()
        self.connection.send((reader, str(path), options))
        if not self.connection.poll(timeout):
            self.stop()
            return ("hang", timeout)
        try:
            return self.connection.recv()
        except EOFError:
            result = ("crash", self.process.wait(), self.output())
            self.stop()
            return result

    def stop(self):
        if self.process is not None:
            self.connection.close()
            self.process.kill()
            self.process.wait()
            self.log.close()
            self.process = None


if __name__ == "__main__":
    serve(int(sys.argv[1]))
