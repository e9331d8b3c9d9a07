"""CUDA memory, streams and the device, through cuda-python's runtime bindings (a PyPI binary wheel:
nothing is compiled, unlike pycuda). Imported lazily: importing this module needs nothing.

cuda-python calls return tuples ``(cudaError_t, *values)``; :func:`_check` turns a failure into one
StageError line. Without a driver (a container started without the GPU) the bindings raise
RuntimeError "Failed to dlopen libcuda.so.1": that is one line too, naming what to do.
"""

from __future__ import annotations

import ctypes
from typing import Any, Dict, Optional, Tuple

from targets.common.contract import StageError

NO_DRIVER = (
    "no CUDA driver in this container ({why}); run it on a host with an NVIDIA GPU and the NVIDIA "
    "container toolkit, through the docker runner (it requests the GPU)"
)


def runtime() -> Any:
    """cuda-python's runtime module (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as rt
    except ImportError:
        try:
            from cuda import cudart as rt
        except ImportError:
            raise StageError(
                "cuda-python is not installed here (pip install cuda-python; the tensorrt image has it)"
            ) from None
    return rt


def _check(result: Any, what: str) -> Tuple[Any, ...]:
    """``(err, *values)`` -> values, or one line with CUDA's name and text of the error."""
    rt = runtime()
    items = result if isinstance(result, tuple) else (result,)
    err, values = items[0], items[1:]
    if err != rt.cudaError_t.cudaSuccess:
        _, text = rt.cudaGetErrorString(err)
        name = getattr(err, "name", str(err))
        raise StageError(f"CUDA {what} failed: {name}: {text.decode() if isinstance(text, bytes) else text}")
    return values


def call(what: str, fn_name: str, *args: Any) -> Tuple[Any, ...]:
    rt = runtime()
    try:
        return _check(getattr(rt, fn_name)(*args), what)
    except RuntimeError as exc:  # the bindings could not load libcuda.so.1
        raise StageError(NO_DRIVER.format(why=str(exc).strip().splitlines()[0][:120])) from None


def device_info() -> Dict[str, Any]:
    """The current device as an engine depends on it: name, compute capability, CUDA driver version."""
    (count,) = call("device count", "cudaGetDeviceCount")
    if count < 1:
        raise StageError(NO_DRIVER.format(why="the driver sees no GPU"))
    (dev,) = call("get device", "cudaGetDevice")
    (prop,) = call("device properties", "cudaGetDeviceProperties", dev)
    (driver,) = call("driver version", "cudaDriverGetVersion")
    name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
    return {
        "index": int(dev),
        "name": name,
        "compute_capability": f"{prop.major}.{prop.minor}",
        "cuda_driver": f"{driver // 1000}.{(driver % 1000) // 10}",
        "devices_visible": int(count),
    }


class Stream:
    def __init__(self) -> None:
        (self.handle,) = call("create stream", "cudaStreamCreate")

    @property
    def ptr(self) -> int:
        return int(self.handle)

    def synchronize(self) -> None:
        call("stream synchronize", "cudaStreamSynchronize", self.handle)

    def close(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            call("destroy stream", "cudaStreamDestroy", handle)


class Buffer:
    """``nbytes`` of pinned host memory (``pinned=True``) or device memory."""

    def __init__(self, nbytes: int, pinned: bool) -> None:
        self.nbytes, self.pinned = int(nbytes), pinned
        fn = "cudaMallocHost" if pinned else "cudaMalloc"
        (ptr,) = call(f"{'pinned host' if pinned else 'device'} allocation of {nbytes} bytes", fn, self.nbytes)
        self.ptr: Optional[int] = int(ptr)

    def array(self, shape: Tuple[int, ...], dtype: Any) -> Any:
        """A numpy view of a pinned host buffer (no copy)."""
        import numpy as np

        if not self.pinned or self.ptr is None:
            raise StageError("internal: only a pinned host buffer has a numpy view")
        raw = (ctypes.c_byte * self.nbytes).from_address(self.ptr)
        count = int(np.prod(shape))
        return np.frombuffer(memoryview(raw).cast("B"), dtype=dtype, count=count).reshape(shape)

    def close(self) -> None:
        if self.ptr is not None:
            ptr, self.ptr = self.ptr, None
            call("free", "cudaFreeHost" if self.pinned else "cudaFree", ptr)


def copy_async(dst: Buffer, src: Buffer, nbytes: int, stream: Stream) -> None:
    rt = runtime()
    kind = (
        rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        if src.pinned and not dst.pinned
        else rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    )
    if nbytes > min(dst.nbytes, src.nbytes):
        raise StageError(f"internal: copy of {nbytes} bytes exceeds a {min(dst.nbytes, src.nbytes)}-byte buffer")
    call("async copy", "cudaMemcpyAsync", dst.ptr, src.ptr, int(nbytes), kind, stream.handle)
