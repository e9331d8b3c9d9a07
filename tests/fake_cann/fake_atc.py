#!/usr/bin/env python3
"""FAKE `atc` (tests/fake_cann): a test double of CANN 5.0.1's ATC, NOT Huawei's tool.

Accepts the flags the ModelZoo ReID guide uses, rejects any other, checks the ONNX input against
--input_shape with ONNX Runtime, and writes ``<output>.om``: b"IMOD", a 256-byte header holding JSON
facts (batch, input, precision, fake: true), then the ONNX bytes.
"""

import json
import os
import sys
import time

ALLOWED = {
    "framework",
    "model",
    "output",
    "input_format",
    "input_shape",
    "log",
    "soc_version",
    "precision_mode",
    "auto_tune_mode",
}
REQUIRED = ("framework", "model", "output", "soc_version")


def fail(code, msg):
    print("ATC run failed, Please check the detail log, Try 'atc --help' for more information")
    print("%s: %s" % (code, msg))
    sys.exit(1)


def main(argv):
    opts = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            fail("E10001", "parameter %r is not --name=value" % arg)
        key, value = arg[2:].split("=", 1)
        if key not in ALLOWED:
            fail("E10001", "unknown parameter --%s" % key)
        opts[key] = value
    for key in REQUIRED:
        if key not in opts:
            fail("E10004", "--%s is required" % key)
    if opts["framework"] != "5":
        fail("E10001", "--framework=%s: this fake converts ONNX only (5)" % opts["framework"])
    if opts.get("input_format", "NCHW") != "NCHW":
        fail("E10001", "--input_format must be NCHW")
    if opts["soc_version"] not in ("Ascend310", "Ascend910"):
        fail("E10001", "--soc_version=%s is not supported" % opts["soc_version"])
    precision = opts.get("precision_mode", "force_fp16")
    if precision not in (
        "force_fp16",
        "force_fp32",
        "allow_mix_precision",
        "allow_fp32_to_fp16",
        "must_keep_origin_dtype",
    ):
        fail("E10001", "--precision_mode=%s is not supported" % precision)
    if opts.get("auto_tune_mode", "RL,GA") not in ("RL", "GA", "RL,GA", "GA,RL"):
        fail("E10001", "--auto_tune_mode=%s is not supported" % opts["auto_tune_mode"])
    if not os.path.isfile(opts["model"]):
        fail("E10016", "--model=%s: file not found" % opts["model"])
    name, _, dims = opts.get("input_shape", "").partition(":")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 4:
        fail("E10001", "--input_shape=%s is not name:n,c,h,w" % opts.get("input_shape"))
    import onnxruntime as ort

    sess = ort.InferenceSession(opts["model"], providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    if inp.name != name:
        fail("E10001", "--input_shape: the model has no input %r (it has %r)" % (name, inp.name))
    for want, have in zip(shape[1:], inp.shape[1:]):
        if isinstance(have, int) and have != want:
            fail("E10001", "--input_shape %s does not match the model's %s" % (shape, inp.shape))
    log_dir = os.environ.get("ASCEND_PROCESS_LOG_PATH")
    if log_dir:
        os.makedirs(os.path.join(log_dir, "plog"), exist_ok=True)
        with open(os.path.join(log_dir, "plog", "plog-%d.log" % os.getpid()), "w") as fh:
            fh.write("[INFO] FAKE ATC (tests/fake_cann) %s %s\n" % (time.strftime("%Y-%m-%d %H:%M:%S"), " ".join(argv)))
    header = json.dumps(
        {
            "fake": True,
            "batch": shape[0],
            "input": name,
            "shape": shape,
            "precision_mode": precision,
            "soc_version": opts["soc_version"],
        }
    ).encode()
    if len(header) > 252:
        fail("E19999", "header too long")
    onnx = open(opts["model"], "rb").read()
    out = opts["output"] + ".om"
    tmp = out + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(b"IMOD" + header.ljust(252, b" ") + onnx)
    os.replace(tmp, out)
    print("ATC start working now, please wait for a moment.")
    print("ATC run success, welcome to the next use.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
