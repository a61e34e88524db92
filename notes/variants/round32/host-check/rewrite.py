"""Copies prelude.cuh and attention.cuh for the host emulation (shim.h):
each inline-PTX statement becomes a call into the emulator, chosen by its
PTX text. An instruction the emulator does not know becomes a call that
aborts if it runs, so a tile that reaches one fails loudly.
Usage: python3 rewrite.py CUDA_DIR OUT_DIR"""
import re
import sys

RULES = [
    ("mma.sync.aligned.m16n8k16", "emu::mma16816(d, a, b)"),
    ("x4.trans.shared", "emu::ldsm(r, 4, true, p)"),
    ("ldmatrix.sync.aligned.m8n8.x4.shared", "emu::ldsm(r, 4, false, p)"),
    ("ldmatrix.sync.aligned.m8n8.x2.shared", "emu::ldsm(r, 2, false, p)"),
    ("cp.async.cg.shared.global", "emu::cp_async16(dst, src, ok)"),
    ("cp.async.commit_group", "(void)0"),
    ("cp.async.wait_group", "(void)0"),
    ("ld.global.L1::no_allocate.v4.u32", "r = *reinterpret_cast<const uint4*>(p)"),
    ("ld.global.nc.L1::no_allocate.v4.u32", "r = *reinterpret_cast<const uint4*>(p)"),
    ("prefetch.global.L2", "(void)0"),
    ("cp.async.bulk.prefetch.L2", "(void)0"),
    ("griddepcontrol", "(void)0"),
    ("prmt.b32", "r = __byte_perm(a, b, sel)"),
]


def rewrite(text):
    out, i = [], 0
    pat = re.compile(r"\basm\s*(volatile\s*)?\(")
    while True:
        m = pat.search(text, i)
        if not m:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i : m.start()])
        j, depth = m.end(), 1
        while depth:
            c = text[j]
            if c == '"':
                j += 1
                while text[j] != '"':
                    j += 2 if text[j] == "\\" else 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
            j += 1
        stmt = text[m.start() : j]
        ptx = re.search(r'"([^"]*)"', stmt).group(1)
        rep = next((r for key, r in RULES if key in stmt), None)
        if rep is None:
            rep = 'emu::unsupported("%s")' % ptx.replace("%", "")
        out.append(rep)
        i = j


src, dst = sys.argv[1], sys.argv[2]
for name in ["prelude.cuh", "attention.cuh"]:
    t = rewrite(open(f"{src}/{name}").read())
    t = t.replace("#include <cuda_bf16.h>", "").replace("#include <cuda_fp16.h>", "")
    t = re.sub(r"typedef (unsigned )?(char|int|long long) u?int\d+_t;", "", t)
    open(f"{dst}/{name}", "w").write(t)
