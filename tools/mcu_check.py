"""The C export on a real cross toolchain and an emulated Cortex-M7, against onnxruntime and the planner.

For each model and quantization: ``ctre-edge``'s C export is cross-compiled with Debian's
``arm-none-eabi-gcc`` (``-mcpu=cortex-m7 -mthumb -mfloat-abi=hard -mfpu=fpv5-d16 -Os``), its
``arm-none-eabi-size`` figures are compared with the planner's (flash = text, RAM = bss + stack),
and a tiny firmware (vector table, semihosting output, no libc stdio, no heap) is linked for QEMU's
MPS2 AN500 board (Cortex-M7) and run on N stored inputs. The firmware prints each label and the
probabilities as float32 bit patterns, so they compare exactly with the host build and within
1e-5 with onnxruntime. It also reads SysTick around every inference: QEMU runs with
``-icount shift=0`` (1 instruction = 1 ns of virtual time) and SysTick counts the board's 25 MHz
clock, so 40 instructions per tick. These are EMULATED INSTRUCTIONS, not cycles of a real chip:
QEMU models no pipeline, caches, flash wait states or FPU latency. The stack is measured by
painting it before the run and finding the deepest word touched.

    python -m tools.mcu_check                     # every method, 64-1000-1000-1000-10 and 64-32-10, 300 epochs
    python -m tools.mcu_check --model m.ctre --quantize int8 --samples 500 --json

Before the emulated run, each model's export is also built with the host compiler and compared with
onnxruntime on 1,000 inputs (float32 and int8 labels, and the int8 accuracy change on the model's own
test split). The emulated part needs ``apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi
qemu-system-arm``; without them the tool says so and runs the host part only.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ARM_FLAGS = ["-mcpu=cortex-m7", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv5-d16", "-Os", "-std=c99",
             "-Wall", "-Wextra", "-Werror"]
HOST_FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-O2"]
QEMU = ["qemu-system-arm", "-M", "mps2-an500", "-cpu", "cortex-m7", "-display", "none", "-monitor", "none",
        "-serial", "none", "-icount", "shift=0"]
INSTRUCTIONS_PER_TICK = 40  # -icount shift=0: 1 ns per instruction; SysTick at the MPS2's 25 MHz
TOLERANCE = 1e-5


def missing_tools() -> str | None:
    """Why the emulated check cannot run here, or None when it can."""
    absent = [t for t in ("arm-none-eabi-gcc", "arm-none-eabi-size", "qemu-system-arm") if shutil.which(t) is None]
    if absent:
        return (f"{', '.join(absent)} not found (Debian: apt-get install gcc-arm-none-eabi "
                f"libnewlib-arm-none-eabi qemu-system-arm)")
    return None


def _read_labels_and_proba(raw: bytes, n: int, n_classes: int):
    rec = np.frombuffer(raw, dtype=np.uint8).reshape(n, 4 * (1 + n_classes))
    return rec[:, :4].copy().view(np.int32)[:, 0], rec[:, 4:].copy().view(np.float32)


HOST_MAIN = """\
#include <stdio.h>
#include "{name}.h"

/* Reads float32 samples from stdin; writes an int label and the float32 probabilities per sample. */
int main(void)
{{
    float x[{upper}_N_FEATURES], p[{upper}_N_CLASSES];
    while (fread(x, sizeof(float), {upper}_N_FEATURES, stdin) == {upper}_N_FEATURES) {{
        int label = {name}_predict(x, p);
        fwrite(&label, sizeof label, 1, stdout);
        fwrite(p, sizeof(float), {upper}_N_CLASSES, stdout);
    }}
    return 0;
}}
"""


def run_host(export_report: dict, X: np.ndarray, n_classes: int, workdir: Path, cc: str = "cc"):
    """Compile an exported pair with the host compiler (``HOST_FLAGS``) and run it: (labels, probabilities)."""
    name = export_report["name"]
    main = workdir / f"{name}_host_main.c"
    main.write_text(HOST_MAIN.format(name=name, upper=name.upper()))
    exe = workdir / f"{name}_host"
    subprocess.run([cc, *HOST_FLAGS, "-o", str(exe), str(main), export_report["source"], "-lm"], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(exe)], input=np.ascontiguousarray(X, dtype=np.float32).tobytes(),
                         capture_output=True, check=True).stdout
    return _read_labels_and_proba(out, X.shape[0], n_classes)


STARTUP = """\
#include <stdint.h>

extern uint32_t _data_load, _data_start, _data_end, _bss_start, _bss_end, _stack_top;
int main(void);
void semihost_exit(int ok);

void Reset_Handler(void)
{
    uint32_t *src = &_data_load, *dst = &_data_start;
    while (dst < &_data_end) {
        *dst++ = *src++;
    }
    for (dst = &_bss_start; dst < &_bss_end; dst++) {
        *dst = 0;
    }
    *(volatile uint32_t *)0xE000ED88 |= 0xFu << 20; /* CPACR: full access to the FPU (CP10, CP11) */
    __asm__ volatile("dsb\\n isb");
    semihost_exit(main() == 0);
}

static void Fault_Handler(void)
{
    semihost_exit(0);
}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {
    (void (*)(void))&_stack_top, Reset_Handler, Fault_Handler, Fault_Handler, Fault_Handler,
    Fault_Handler, Fault_Handler, 0, 0, 0, 0, Fault_Handler, Fault_Handler, 0, Fault_Handler, Fault_Handler,
};
"""

FIRMWARE_MAIN = """\
#include <stdint.h>
#include "{name}.h"
#include "inputs.h"

#define SYST_CSR (*(volatile uint32_t *)0xE000E010)
#define SYST_RVR (*(volatile uint32_t *)0xE000E014)
#define SYST_CVR (*(volatile uint32_t *)0xE000E018)
#define STACK_PAINT 0xDEADBEEFu

extern uint32_t _stack_bottom;

static int semihost(int op, const void *arg)
{{
    register int r0 __asm__("r0") = op;
    register const void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xab" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}}

void semihost_exit(int ok)
{{
    semihost(0x18, (const void *)(ok ? 0x20026 : 0x20023)); /* SYS_EXIT: ApplicationExit or RunTimeError */
    for (;;) {{
    }}
}}

static char line[32 + 9 * {upper}_N_CLASSES];
static int length;

static void put_char(char c)
{{
    line[length++] = c;
}}

static void put_hex(uint32_t v)
{{
    int shift;
    put_char(' ');
    for (shift = 28; shift >= 0; shift -= 4) {{
        put_char("0123456789abcdef"[(v >> shift) & 0xFu]);
    }}
}}

static void put_uint(uint32_t v)
{{
    char digits[10];
    int n = 0;
    put_char(' ');
    do {{
        digits[n++] = (char)('0' + v % 10u);
        v /= 10u;
    }} while (v);
    while (n) {{
        put_char(digits[--n]);
    }}
}}

static void flush(void)
{{
    put_char('\\n');
    put_char(0);
    semihost(0x04, line); /* SYS_WRITE0 */
    length = 0;
}}

/* Prints per sample: "s LABEL TICKS P0 P1 ..." with the probabilities as float32 bits; then "stack BYTES". */
int main(void)
{{
    static float p[{upper}_N_CLASSES];
    uint32_t *w, sp;
    int i, k;
    __asm__ volatile("mov %0, sp" : "=r"(sp));
    for (w = &_stack_bottom; (uint32_t)w < sp - 64u; w++) {{
        *w = STACK_PAINT;
    }}
    SYST_RVR = 0xFFFFFFu;
    SYST_CVR = 0u;
    SYST_CSR = 5u; /* enabled, processor clock, no interrupt */
    for (i = 0; i < N_INPUTS; i++) {{
        uint32_t before, after;
        int label;
        union {{
            float f;
            uint32_t u;
        }} bits;
        before = SYST_CVR;
        label = {name}_predict(inputs[i], p);
        after = SYST_CVR;
        put_char('s');
        put_uint((uint32_t)label);
        put_uint((before - after) & 0xFFFFFFu);
        for (k = 0; k < {upper}_N_CLASSES; k++) {{
            bits.f = p[k];
            put_hex(bits.u);
        }}
        flush();
    }}
    for (w = &_stack_bottom; *w == STACK_PAINT; w++) {{
    }}
    put_char('s');
    put_char('t');
    put_uint(sp - (uint32_t)w);
    flush();
    return 0;
}}
"""

LINKER_SCRIPT = """\
/* QEMU mps2-an500: 4 MB ZBT SSRAM1 at 0 holds the image, 4 MB SSRAM2/3 at 0x20000000 is RAM. */
MEMORY
{
    FLASH (rx) : ORIGIN = 0x00000000, LENGTH = 4M
    RAM (rwx) : ORIGIN = 0x20000000, LENGTH = 4M
}
ENTRY(Reset_Handler)
SECTIONS
{
    .text : { KEEP(*(.vectors)) *(.text*) *(.rodata*) . = ALIGN(4); } > FLASH
    .ARM.exidx : { *(.ARM.exidx*) } > FLASH
    .data : { _data_start = .; *(.data*) . = ALIGN(4); _data_end = .; } > RAM AT > FLASH
    _data_load = LOADADDR(.data);
    .bss (NOLOAD) : { _bss_start = .; *(.bss*) *(COMMON) . = ALIGN(4); _bss_end = .; } > RAM
    _stack_bottom = ALIGN(8);
    _stack_top = ORIGIN(RAM) + LENGTH(RAM);
}
"""


def _inputs_header(X: np.ndarray) -> str:
    rows = []
    for x in np.asarray(X, dtype=np.float32):
        rows.append("    {" + ", ".join(f"{float(v):.9g}f" if float(v) % 1 else f"{float(v):.1f}f" for v in x) + "}")
    return (f"#define N_INPUTS {X.shape[0]}\n"
            f"static const float inputs[N_INPUTS][{X.shape[1]}] = {{\n" + ",\n".join(rows) + "\n};\n")


def arm_size(obj: Path) -> dict:
    """text, data, bss of an object or ELF, from arm-none-eabi-size (Berkeley format)."""
    out = subprocess.run(["arm-none-eabi-size", str(obj)], check=True, capture_output=True, text=True).stdout
    text, data, bss = (int(v) for v in out.splitlines()[1].split()[:3])
    return {"text": text, "data": data, "bss": bss}


def run_emulated(export_report: dict, X: np.ndarray, n_classes: int, workdir: Path, timeout: float = 300) -> dict:
    """Cross-compile, size, link and run on QEMU; returns sizes, labels, probabilities, ticks and stack."""
    name, source = export_report["name"], Path(export_report["source"])
    obj = workdir / f"{name}.o"
    subprocess.run(["arm-none-eabi-gcc", *ARM_FLAGS, "-fstack-usage", "-I", str(source.parent), "-c", str(source),
                    "-o", str(obj)], check=True, capture_output=True, text=True, cwd=workdir)
    sizes = arm_size(obj)
    symbols = subprocess.run(["arm-none-eabi-nm", str(obj)], check=True, capture_output=True, text=True).stdout
    (workdir / "startup.c").write_text(STARTUP)
    (workdir / "main.c").write_text(FIRMWARE_MAIN.format(name=name, upper=name.upper()))
    (workdir / "inputs.h").write_text(_inputs_header(X))
    (workdir / "link.ld").write_text(LINKER_SCRIPT)
    elf = workdir / "firmware.elf"
    subprocess.run(["arm-none-eabi-gcc", *ARM_FLAGS, "-ffreestanding", "-nostartfiles", "--specs=nano.specs",
                    "-T", str(workdir / "link.ld"), "-Wl,--gc-sections", "-ffunction-sections", "-fdata-sections",
                    "-I", str(source.parent), "-I", str(workdir), str(workdir / "startup.c"), str(workdir / "main.c"),
                    str(obj), "-lm", "-o", str(elf)], check=True, capture_output=True, text=True, cwd=workdir)
    linked = subprocess.run(["arm-none-eabi-nm", str(elf)], check=True, capture_output=True, text=True).stdout
    heap = sorted({s for s in re.findall(r"\b\w+\b", linked) if s in ("malloc", "_malloc_r", "calloc", "free", "_sbrk")})
    console = workdir / "semihosting.txt"  # the semihosting console goes to a file: QEMU writes it to a tty otherwise
    console.unlink(missing_ok=True)
    r = subprocess.run([*QEMU, "-chardev", f"file,id=semihosting,path={console}", "-semihosting-config",
                        "enable=on,target=native,chardev=semihosting", "-kernel", str(elf)],
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    printed = console.read_text() if console.exists() else ""
    if r.returncode != 0:
        raise RuntimeError(f"qemu exited with {r.returncode}: {printed[-500:]} {r.stderr[-500:]}")
    labels, ticks, proba, stack = [], [], [], None
    for line in printed.splitlines():
        parts = line.split()
        if parts and parts[0] == "s":
            labels.append(int(parts[1]))
            ticks.append(int(parts[2]))
            proba.append([int(h, 16) for h in parts[3:3 + n_classes]])
        elif parts and parts[0] == "st":
            stack = int(parts[1])
    if len(labels) != X.shape[0]:
        raise RuntimeError(f"the firmware printed {len(labels)} of {X.shape[0]} results:\n{printed[-1000:]}")
    su = (workdir / f"{name}.su").read_text() if (workdir / f"{name}.su").exists() else ""
    return {"size": sizes, "undefined": sorted(re.findall(r"^\s+U (\w+)$", symbols, re.M)), "heap_symbols": heap,
            "firmware_size": arm_size(elf), "labels": np.array(labels),
            "proba": np.array(proba, dtype=np.uint32).view(np.float32), "ticks": np.array(ticks),
            "stack_measured": stack, "stack_usage": su}


def compare(model, export_report, X, workdir: Path, onnx_proba: np.ndarray, host=None) -> dict:
    """Everything one table row shows, as numbers: sizes against the plan, labels and probabilities."""
    from ctre_edge.export_c import predict_int8

    em = run_emulated(export_report, X, len(model.classes), workdir)
    plan = export_report["memory"]
    want = predict_int8(model, X) if export_report["quantize"] == "int8" else onnx_proba
    row = {
        "quantize": export_report["quantize"],
        "planned_flash": plan["flash_bytes"], "text": em["size"]["text"] + em["size"]["data"],
        "planned_workspace": plan["ram"]["workspace"], "bss": em["size"]["bss"] + em["size"]["data"],
        "planned_stack": plan["ram"]["stack"], "stack_measured": em["stack_measured"],
        "undefined": em["undefined"], "heap_symbols": em["heap_symbols"],
        "samples": int(X.shape[0]),
        "labels_equal_onnxruntime": float(np.mean(em["labels"] == np.argmax(onnx_proba, axis=1))),
        "labels_equal_reference": float(np.mean(em["labels"] == np.argmax(want, axis=1))),
        "max_abs_diff_reference": float(np.max(np.abs(em["proba"] - want))),
        "instructions_per_inference": float(np.mean(em["ticks"]) * INSTRUCTIONS_PER_TICK),
        "firmware_text": em["firmware_size"]["text"],
    }
    if host is not None:
        row["bit_identical_to_host"] = bool(np.array_equal(em["proba"].view(np.uint32), host[1].view(np.uint32))
                                            and np.array_equal(em["labels"], host[0]))
    row["flash_ratio"] = row["text"] / row["planned_flash"]
    row["workspace_ratio"] = row["bss"] / row["planned_workspace"]
    return row


def _train_models(methods, shapes, epochs):
    from ctre_edge.data import load_data
    from ctre_edge.train import TrainConfig, train

    data = load_data("builtin:digits")
    for hidden in shapes:
        for method in methods:
            config = TrainConfig(hidden=hidden, epsilon=1.0, method=method, epochs=epochs, seed=0)
            yield f"{method} {'-'.join(map(str, [64, *hidden, 10]))}", train(data, config).model


def host_row(model, data, X, onnx_proba, work: Path) -> dict:
    """float32 C against onnxruntime, int8 C against float32, and accuracy on the model's own test split."""
    from ctre_edge.export_c import export_c, own_test_split

    check = own_test_split(model, data) if model.n_features == data.n_features else None
    f32 = export_c(model, work / "host_f32.c", force=True, check=check)
    i8 = export_c(model, work / "host_i8.c", quantize="int8", force=True, check=check)
    labels, proba = run_host(f32, X, len(model.classes), work)
    labels8, _ = run_host(i8, X, len(model.classes), work)
    want = np.argmax(onnx_proba, axis=1)
    return {"samples": int(X.shape[0]), "max_abs_diff_onnxruntime": float(np.max(np.abs(proba - onnx_proba))),
            "labels_equal_onnxruntime": float(np.mean(labels == want)),
            "int8_labels_equal_onnxruntime": float(np.mean(labels8 == want)),
            "accuracy_float32": i8.get("accuracy_float32"), "accuracy_int8": i8.get("accuracy_int8"),
            "test_samples": i8.get("check_count")}


FIT_SHAPES = [[64, 32, 10], [64, 100, 10], [64, 100, 100, 10], [64, 100, 100, 100, 10], [784, 1000, 1000, 1000, 10],
              [64, 300, 300, 10], [64, 1000, 10], [20, 5, 3], [64, 2000, 2000, 10]]


def fit_code(workdir: Path) -> int:
    """Print code bytes (.text of NAME.o) over shapes and the least-squares CODE_* constants of mcu_plan."""
    from ctre_edge import export_c as xc
    from ctre_edge import mcu_plan
    from ctre_edge.layers import erdos_renyi_layer
    from ctre_edge.model import SparseMLP

    rng = np.random.default_rng(0)
    samples = {"none": [], "int8": []}
    print("| quantize | sizes | epsilon | kernels | layers | .text of NAME.o | estimate |")
    print("|---|---|---|---|---|---|---|")
    for sizes in FIT_SHAPES:
        for eps in (1, 20):
            layers = [erdos_renyi_layer(a, b, eps, rng) for a, b in zip(sizes[:-1], sizes[1:])]
            model = SparseMLP(layers, np.zeros(sizes[0], np.float32), np.ones(sizes[0], np.float32),
                              list(range(sizes[-1])))
            kernels = len({mcu_plan._kernel_types(a, b, z) for a, b, z in zip(sizes[:-1], sizes[1:], model.nnz)})
            for quantize in samples:
                report = xc.export_c(model, workdir / "fit.c", quantize=quantize, force=True)
                obj = workdir / "fit.o"
                subprocess.run(["arm-none-eabi-gcc", *ARM_FLAGS, "-c", report["source"], "-o", str(obj)], check=True)
                out = subprocess.run(["arm-none-eabi-size", "-A", str(obj)], capture_output=True, text=True).stdout
                text = int(re.search(r"^\.text\s+(\d+)", out, re.M).group(1))
                samples[quantize].append((kernels, len(layers), text))
                print(f"| {quantize} | {'-'.join(map(str, sizes))} | {eps} | {kernels} | {len(layers)} | {text} "
                      f"| {report['memory']['flash']['code']} |")
    for quantize, rows in samples.items():
        A = np.array([[1, k, n] for k, n, _ in rows], dtype=float)
        b = np.array([t for *_, t in rows], dtype=float)
        coef = np.linalg.lstsq(A, b, rcond=None)[0]
        print(f"\n{quantize}: CODE_BASE {coef[0]:.0f}, CODE_PER_KERNEL {coef[1]:.0f}, CODE_PER_LAYER {coef[2]:.0f}; "
              f"largest error {np.abs(A @ coef - b).max():.0f} bytes over {len(rows)} builds")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, action="append", help="a model written by train --out (repeatable); "
                        "default: train on builtin:digits with --methods, --hidden and --epochs")
    parser.add_argument("--methods", default="static,set,ctre-sim,ctre-seq", help="comma-separated methods to train")
    parser.add_argument("--hidden", action="append", help="hidden widths of a shape to train (repeatable; default "
                        "1000,1000,1000 and 32)")
    parser.add_argument("--epochs", type=int, default=300, help="training epochs (300: the trainer's default)")
    parser.add_argument("--quantize", default="none,int8", help="emulated builds: comma-separated none, int8")
    parser.add_argument("--samples", type=int, default=200, help="stored inputs the emulated firmware runs")
    parser.add_argument("--host-samples", type=int, default=1000, help="inputs of the host-compiler comparison")
    parser.add_argument("--keep", type=Path, help="build in this directory and keep it")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    parser.add_argument("--fit-code", action="store_true", help="only measure code size over shapes and fit "
                        "the planner's CODE_* constants")
    args = parser.parse_args(argv)
    if args.fit_code:
        reason = missing_tools()
        if reason:
            print(f"cannot measure code size: {reason}", file=sys.stderr)
            return 2
        work = args.keep or Path(tempfile.mkdtemp(prefix="mcu-fit-"))
        work.mkdir(parents=True, exist_ok=True)
        return fit_code(work)
    from ctre_edge.data import load_data
    from ctre_edge.export import check_inputs, export_onnx
    from ctre_edge.export_c import export_c
    from ctre_edge.model import SparseMLP
    from ctre_edge.runtime import OnnxModel

    reason = missing_tools()
    if reason:
        print(f"emulated check skipped: {reason}", file=sys.stderr)
    base = args.keep or Path(tempfile.mkdtemp(prefix="mcu-check-"))
    base.mkdir(parents=True, exist_ok=True)
    if args.model:
        models = [(p.stem, SparseMLP.load(p)) for p in args.model]
    else:
        shapes = [tuple(int(h) for h in text.split(",")) for text in (args.hidden or ["1000,1000,1000", "32"])]
        models = _train_models(args.methods.split(","), shapes, args.epochs)
    data = load_data("builtin:digits")
    host_rows, rows = [], []
    for label, model in models:
        def inputs(n):
            return data.X[:n].astype(np.float32) if model.n_features == data.n_features else check_inputs(model, n)

        work = base / re.sub(r"\W+", "_", label)
        work.mkdir(exist_ok=True)
        if not args.model:  # kept, so the same models can be checked again with --model
            model.save(work / "model.ctre", force=True)
        onnx_path = work / "model.onnx"
        export_onnx(model, onnx_path, force=True)
        onnx_model = OnnxModel(onnx_path)
        if shutil.which("cc"):
            X = inputs(args.host_samples)
            host_rows.append({"model": label, **host_row(model, data, X, onnx_model.predict_proba(X), work)})
        if reason:
            continue
        X = inputs(args.samples)
        onnx_proba = onnx_model.predict_proba(X)
        for quantize in args.quantize.split(","):
            qwork = work / quantize
            qwork.mkdir(exist_ok=True)
            report = export_c(model, qwork / "model.c", quantize=quantize, force=True)
            host = run_host(report, X, len(model.classes), qwork) if shutil.which("cc") else None
            row = compare(model, report, X, qwork, onnx_proba, host)
            row["model"] = label
            rows.append(row)
    if args.json:
        print(json.dumps({"host": host_rows, "rows": rows, "build_dir": str(base), "skipped": reason}, indent=1))
    else:
        _print_tables(host_rows, rows)
    ok = all(r["max_abs_diff_onnxruntime"] <= TOLERANCE for r in host_rows)
    ok &= all(r["labels_equal_reference"] == 1.0 and not r["heap_symbols"] and 0.9 <= r["flash_ratio"] <= 1.1
              and 0.9 <= r["workspace_ratio"] <= 1.1 for r in rows)
    return 0 if ok else 1


def _print_tables(host_rows, rows) -> None:
    if host_rows:
        print("Host build (cc -std=c99 -Wall -Wextra -Werror -O2) against onnxruntime on the first builtin:digits "
              "samples; accuracy on the model's own test split:\n")
        print("| model | samples | float32 max abs diff | float32 labels = onnxruntime | int8 labels = onnxruntime "
              "| test accuracy float32 | test accuracy int8 |")
        print("|---|---|---|---|---|---|---|")
        for r in host_rows:
            acc = ("-", "-") if r["accuracy_float32"] is None else \
                (f"{r['accuracy_float32']:.4f}", f"{r['accuracy_int8']:.4f} ({100 * (r['accuracy_int8'] - r['accuracy_float32']):+.2f})")
            print(f"| {r['model']} | {r['samples']} | {r['max_abs_diff_onnxruntime']:.1e} "
                  f"| {r['labels_equal_onnxruntime']:.1%} | {r['int8_labels_equal_onnxruntime']:.1%} | {acc[0]} | {acc[1]} |")
        print()
    if not rows:
        return
    print("Planner against arm-none-eabi-size of the exported object (Cortex-M7, -Os):\n")
    print("| model | weights | planned flash | text + data | ratio | planned workspace | bss + data | ratio "
          "| stack estimate | stack measured | heap symbols |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['quantize']} | {r['planned_flash']:,} | {r['text']:,} | {r['flash_ratio']:.3f} "
              f"| {r['planned_workspace']:,} | {r['bss']:,} | {r['workspace_ratio']:.3f} | {r['planned_stack']} "
              f"| {r['stack_measured']} | {', '.join(r['heap_symbols']) or 'none'} |")
    print("\nEmulated run (QEMU mps2-an500, Cortex-M7, -icount shift=0; instructions, not cycles of a real chip):\n")
    print("| model | weights | samples | labels = onnxruntime | labels = reference | max abs diff to reference "
          "| bit-identical to host build | emulated instructions per inference |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['quantize']} | {r['samples']} | {r['labels_equal_onnxruntime']:.1%} "
              f"| {r['labels_equal_reference']:.1%} | {r['max_abs_diff_reference']:.2e} "
              f"| {'yes' if r.get('bit_identical_to_host') else 'no'} | {r['instructions_per_inference']:,.0f} |")
    print("\nreference: onnxruntime for float32, the numpy twin of the int8 arithmetic (ctre_edge.export_c."
          "predict_int8) for int8")


if __name__ == "__main__":
    sys.exit(main())
