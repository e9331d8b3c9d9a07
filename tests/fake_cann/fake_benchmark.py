#!/usr/bin/env python3
"""FAKE `benchmark.x86_64` (tests/fake_cann): a test double of CANN 5.0.1's benchmark tool, NOT Huawei's.

Accepts the flags the ModelZoo ReID guide uses (vision, real data, no DVPP, binary output), rejects
any other, reads the OM the fake atc wrote (an ONNX after a 256-byte IMOD header), and computes with
ONNX Runtime on the CPU: inputs and outputs rounded to fp16 when the OM is force_fp16. Writes
``result/dumpOutput_device<N>/<stem>_1.bin`` (float32) and ``result/perf_vision_batchsize_<bs>_device_<N>.txt``
in the guide's format, into the current folder.
"""

import json
import os
import sys
import time

ALLOWED = {
    "model_type",
    "device_id",
    "batch_size",
    "om_path",
    "input_text_path",
    "input_width",
    "input_height",
    "output_binary",
    "useDvpp",
}


def fail(msg):
    print("[ERROR] %s" % msg)
    sys.exit(1)


def main(argv):
    opts = {}
    for arg in argv:
        if not arg.startswith("-") or arg.startswith("--") or "=" not in arg:
            fail("parameter %r is not -name=value" % arg)
        key, value = arg[1:].split("=", 1)
        if key not in ALLOWED:
            fail("unknown parameter -%s" % key)
        opts[key] = value
    missing = sorted(ALLOWED - set(opts))
    if missing:
        fail("missing parameters: %s" % ", ".join("-" + m for m in missing))
    if opts["model_type"] != "vision" or opts["useDvpp"] != "False" or opts["output_binary"] != "True":
        fail("this fake runs -model_type=vision -useDvpp=False -output_binary=True only")
    device, batch = int(opts["device_id"]), int(opts["batch_size"])
    width, height = int(opts["input_width"]), int(opts["input_height"])
    import numpy as np
    import onnxruntime as ort

    raw = open(opts["om_path"], "rb").read()
    if raw[:4] != b"IMOD":
        fail("%s is not an offline model" % opts["om_path"])
    meta = json.loads(raw[4:256].decode().strip())
    if meta["batch"] != batch:
        fail("-batch_size=%d but the OM was converted for batch %d" % (batch, meta["batch"]))
    if meta["shape"][2:] != [height, width]:
        fail("-input_height/-input_width %dx%d differ from the OM's %s" % (height, width, meta["shape"]))
    sess = ort.InferenceSession(raw[256:], providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    fp16 = meta["precision_mode"] in ("force_fp16", "allow_fp32_to_fp16")
    rows = [ln.split() for ln in open(opts["input_text_path"]).read().splitlines() if ln.strip()]
    c = meta["shape"][1]
    dump = os.path.join("result", "dumpOutput_device%d" % device)
    os.makedirs(dump, exist_ok=True)
    print("[INFO] FAKE benchmark (tests/fake_cann): no NPU, ONNX Runtime on the CPU")
    t0 = time.perf_counter()
    infer_s = 0.0
    for start in range(0, len(rows), batch):
        chunk = rows[start : start + batch]
        arrs = []
        for row in chunk:
            a = np.fromfile(row[1], dtype=np.float32)
            if a.size != c * height * width:
                fail("%s: %d floats, expected %d" % (row[1], a.size, c * height * width))
            arrs.append(a.reshape(c, height, width))
        x = np.stack(arrs + [arrs[-1]] * (batch - len(arrs)))  # the last batch padded, as the tool does
        if fp16:
            x = x.astype(np.float16).astype(np.float32)
        t1 = time.perf_counter()
        y = sess.run(None, {name: x})[0]
        infer_s += time.perf_counter() - t1
        if fp16:
            y = y.astype(np.float16).astype(np.float32)
        for row, feat in zip(chunk, y):
            stem = os.path.splitext(os.path.basename(row[1]))[0]
            feat.astype("<f4").tofile(os.path.join(dump, "%s_1.bin" % stem))
    e2e = time.perf_counter() - t0
    n = max(len(rows), 1)
    fps = n / max(e2e, 1e-9)
    ifps = n / max(infer_s, 1e-9)
    with open(os.path.join("result", "perf_vision_batchsize_%d_device_%d.txt" % (batch, device)), "w") as fh:
        fh.write("[e2e] throughputRate: %g, latency: %g\n" % (round(fps, 3), round(e2e * 1000, 3)))
        fh.write("[data read] throughputRate: %g, moduleLatency: %g\n" % (round(fps, 3), round(1000 / fps, 5)))
        fh.write("[preprocess] throughputRate: %g, moduleLatency: %g\n" % (round(fps, 3), round(1000 / fps, 5)))
        fh.write(
            "[infer] throughputRate: %g, Interface throughputRate: %g, moduleLatency: %g\n"
            % (round(fps, 3), round(ifps, 3), round(1000 / ifps, 5))
        )
        fh.write(
            "[post] throughputRate: %g, moduleLatency: %g\n" % (round(fps / batch, 3), round(batch * 1000 / fps, 5))
        )
    print("-----------------Performance Summary------------------")
    print("[e2e] throughputRate: %g, latency: %g" % (round(fps, 3), round(e2e * 1000, 3)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
