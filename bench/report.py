"""Turns a device record (bench/gpu_check.sh's record.json) into the README's
Performance section: a table per shape (NSA against the fastest dense SDPA backend
and fla's Triton NSA), the decode steps, where the time goes (the record's kernel
profile) and the benchmark issue's targets with the measured values.

    python bench/report.py bench/results/<record>.json              # markdown to stdout
    python bench/report.py bench/results/<record>.json --readme README.md
        # replaces the text between <!-- perf:begin --> and <!-- perf:end -->

A bare list of rows (bench/suite.py --json) works too. Rows that failed or were
skipped show as "-", and a target whose rows are missing says "not measured".
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional, Tuple

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"
NSA = "nsa_cuda.sparse_attn"
DENSE = "sdpa.fastest"
FLA = "fla.parallel_nsa"
NSA_FLA = "nsa_cuda@fla_conv.sparse_attn"


def load(path: str) -> Tuple[dict, List[dict]]:
    with open(path) as f:
        data = json.load(f)
    if isinstance(data, list):
        return {}, data
    return data, data.get("bench") or []


class Rows:
    def __init__(self, rows: List[dict]):
        self.rows = rows

    def get(self, shape: str, T: int, op: str, pass_: str) -> Optional[dict]:
        for r in self.rows:
            if (r.get("shape") == shape and r.get("T") == T and r.get("op") == op
                    and r.get("pass") == pass_ and r.get("ms") is not None):
                return r
        return None

    def ms(self, shape, T, op, pass_) -> Optional[float]:
        r = self.get(shape, T, op, pass_)
        return None if r is None else r["ms"]

    def shapes(self) -> List[str]:
        return sorted({r["shape"] for r in self.rows if r.get("shape")})

    def lengths(self, shape: str, prefill: bool = True) -> List[int]:
        return sorted({r["T"] for r in self.rows if r.get("shape") == shape and r.get("T")
                       and (r.get("pass") != "decode" or not prefill)})


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None or b == 0 else a / b


def _x(r: Optional[float]) -> str:
    return "-" if r is None else f"{r:.2f}x"


def shape_table(rows: Rows, shape: str) -> List[str]:
    out = [f"**{shape}** (ms; speedup = dense / NSA)", "",
           "| T | fwd NSA | fwd dense | speedup | bwd NSA | bwd dense | speedup "
           "| fwd+bwd NSA | fwd+bwd dense | speedup | fwd+bwd fla | fwd+bwd NSA (fla conv.) "
           "| vs fla |",
           "| ---: " * 13 + "|"]
    for T in rows.lengths(shape):
        cells = [str(T)]
        for p in ("fwd", "bwd", "fwd+bwd"):
            n, d = rows.ms(shape, T, NSA, p), rows.ms(shape, T, DENSE, p)
            cells += [_ms(n), _ms(d), _x(_ratio(d, n))]
        f, nf = rows.ms(shape, T, FLA, "fwd+bwd"), rows.ms(shape, T, NSA_FLA, "fwd+bwd")
        cells += [_ms(f), _ms(nf), _x(_ratio(f, nf))]
        out.append("| " + " | ".join(cells) + " |")
    return out


def _time_per_flop(rows: Rows, shape: str, T: int, op: str) -> Optional[float]:
    r = rows.get(shape, T, op, "fwd")
    if r is None or not r.get("flops"):
        return None
    return r["ms"] / r["flops"]


def targets(rows: Rows, T: int = 65536) -> List[Tuple[str, str, str]]:
    """(target, measured, met) for each target of the benchmark issue."""
    res = []

    def add(name, value: Optional[float], fmt, ok):
        res.append((name, "not measured" if value is None else fmt.format(value),
                    "-" if value is None else ("yes" if ok(value) else "no")))

    sp = _ratio(rows.ms("paper", T, DENSE, "fwd"), rows.ms("paper", T, NSA, "fwd"))
    add("forward at 64k >= 7x the fastest dense SDPA (paper)", sp, "{:.2f}x", lambda v: v >= 7)
    sp = _ratio(rows.ms("paper", T, DENSE, "bwd"), rows.ms("paper", T, NSA, "bwd"))
    add("backward at 64k >= 6x the fastest dense SDPA (paper)", sp, "{:.2f}x", lambda v: v >= 6)
    sp = _ratio(rows.ms("paper", T, FLA, "fwd+bwd"), rows.ms("paper", T, NSA_FLA, "fwd+bwd"))
    add("fwd+bwd at 64k >= 3x fla parallel_nsa (its conventions, paper)", sp, "{:.2f}x",
        lambda v: v >= 3)
    tf = [r["tflops"] for r in rows.rows if r.get("shape") == "paper"
          and r.get("op") == "nsa_cuda.branch.selected" and r.get("pass") == "fwd"
          and r.get("tflops")]
    add("selected branch at G=16 >= 250 effective TFLOP/s (paper, best T)",
        max(tf) if tf else None, "{:.0f} TFLOP/s", lambda v: v >= 250)
    c = rows.ms("peer", T, "nsa_cuda.branch.compressed", "fwd")
    s = rows.ms("peer", T, "nsa_cuda.branch.selection", "fwd")
    add("compressed branch + selection at 64k, D=128 < 20 ms (peer)",
        None if c is None or s is None else c + s, "{:.2f} ms", lambda v: v < 20)
    g4 = _time_per_flop(rows, "gqa4", T, "nsa_cuda.branch.selected")
    g16 = _time_per_flop(rows, "peer", T, "nsa_cuda.branch.selected")
    add("selected branch G=4 time per FLOP within 1.25x of G=16 (gqa4 vs peer, 64k)",
        _ratio(g4, g16), "{:.2f}x", lambda v: v <= 1.25)
    ok_from = []
    for L in rows.lengths("paper"):
        sp = _ratio(rows.ms("paper", L, DENSE, "fwd+bwd"), rows.ms("paper", L, NSA, "fwd+bwd"))
        if sp is not None:
            ok_from.append((L, sp))
    if ok_from:
        bad = [L for L, v in ok_from if L >= 4096 and v <= 1]
        text = ", ".join(f"{L}: {v:.2f}x" for L, v in ok_from)
        res.append(("fwd+bwd faster than dense from 4k tokens on (paper)", text,
                    "no" if bad else ("yes" if min(L for L, _ in ok_from) <= 4096
                                      else "yes where measured (4k not measured)")))
    else:
        res.append(("fwd+bwd faster than dense from 4k tokens on (paper)", "not measured", "-"))
    nsa_dec = decode_ms(rows, "paper", T, 1, NSA_DECODE)
    dense_dec = decode_ms(rows, "paper", T, 1, (DENSE_DECODE,))
    add("decode step at 64k >= 10x dense decoding (paper, batch 1)", _ratio(dense_dec, nsa_dec),
        "{:.2f}x", lambda v: v >= 10)
    return res


NSA_DECODE = ("nsa_cuda.decode", "nsa_cuda.decode.graph")
DENSE_DECODE = "sdpa.decode"


def decode_ms(rows: Rows, shape: str, T: int, B: int, ops) -> Optional[float]:
    """The fastest of these decode rows (NSA: eager or replayed from a CUDA graph)."""
    times = [r["ms"] for r in rows.rows if r.get("shape") == shape and r.get("T") == T
             and r.get("B", 1) == B and r.get("op") in ops and r.get("pass") == "decode"
             and r.get("ms") is not None]
    return min(times) if times else None


def decode_table(rows: Rows) -> List[str]:
    keys = sorted({(r["shape"], r.get("B", 1), r["T"]) for r in rows.rows
                   if r.get("pass") == "decode" and r.get("op") in NSA_DECODE + (DENSE_DECODE,)})
    if not keys:
        return []
    out = ["**decode step** (one new token, ms; speedup = dense / NSA)", "",
           "| shape | B | T | NSA eager | NSA CUDA graph | dense SDPA | speedup |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for shape, B, T in keys:
        eager = decode_ms(rows, shape, T, B, ("nsa_cuda.decode",))
        graph = decode_ms(rows, shape, T, B, ("nsa_cuda.decode.graph",))
        dense = decode_ms(rows, shape, T, B, (DENSE_DECODE,))
        best = decode_ms(rows, shape, T, B, NSA_DECODE)
        out.append(f"| {shape} | {B} | {T} | {_ms(eager)} | {_ms(graph)} | {_ms(dense)} "
                   f"| {_x(_ratio(dense, best))} |")
    return out + [""]


SELECTED_VARIANTS = (("selected", "the suite's selections"),
                     ("selected_1stage", "one K/V stage"),
                     ("selected_shared", "shared within l'-blocks"),
                     ("selected_keysplit2", "2 key-range passes"),
                     ("selected_keysplit4", "4 key-range passes"))


def selected_table(rows: Rows) -> List[str]:
    """The selected forward against its bytes (bench/suite.py, SELECTED_CTA_ROWS): the
    same FLOPs with the suite's selections (two K/V stages, the default, and one), with
    fewer bytes (shared selections), and with the same bytes from a working set a
    pass's key range keeps in L2."""
    keys = sorted({(r["shape"], r["T"]) for r in rows.rows if r.get("ms") is not None
                   and r.get("op") == "nsa_cuda.branch.selected_shared"})
    if not keys:
        return []
    out = ["**selected forward, by its bytes** (ms, effective TFLOP/s and GB/s of the K/V each "
           "CTA loads, q and o; the same FLOPs in every column)", "",
           "| shape | T | " + " | ".join(name for _, name in SELECTED_VARIANTS) + " |",
           "| --- | ---: | " + " | ".join("---:" for _ in SELECTED_VARIANTS) + " |"]
    for shape, T in keys:
        cells = []
        for op, _ in SELECTED_VARIANTS:
            r = rows.get(shape, T, f"nsa_cuda.branch.{op}", "fwd")
            if r is None:
                cells.append("-")
                continue
            tf = f"{r['tflops']:.0f} TF/s" if r.get("tflops") else "-"
            gb = f"{r['gbps']:.0f} GB/s" if r.get("gbps") else "-"
            cells.append(f"{_ms(r['ms'])} ({tf}, {gb})")
        out.append(f"| {shape} | {T} | " + " | ".join(cells) + " |")
    return out + [""]


def profile_table(profiles: List[dict], top: int = 4) -> List[str]:
    """Where a call's time goes (the record's `profile`, bench/kernel_profile.py): per case
    the wall time, the GPU's busy share and the ops taking the most kernel time."""
    cases = [p for p in profiles if p.get("ops") is not None]
    if not cases:
        return []
    out = ["**where the time goes** (bench/kernel_profile.py: ms per call; busy = kernel time / wall "
           "time; the ops with the most kernel time, and their share of it)", "",
           "| shape | T | B | pass | wall | busy | top ops |", "| --- | ---: | ---: | --- | ---: | ---: | --- |"]
    for p in cases:
        total = p.get("kernel_ms") or 0.0
        ops = ", ".join(f"{o['name'].replace('nsa_cuda::', '')} {_ms(o['ms'])}"
                        + (f" ({100 * o['ms'] / total:.0f}%)" if total > 0 else "")
                        for o in p["ops"][:top])
        busy = p.get("busy")
        out.append(f"| {p.get('shape')} | {p.get('T')} | {p.get('B')} | {p.get('pass')} | {_ms(p.get('wall_ms'))} "
                   f"| {'-' if busy is None else f'{busy:.2f}'} | {ops} |")
    return out + [""]


def render(record: dict, rows_list: List[dict]) -> str:
    rows = Rows(rows_list)
    lines = []
    if record:
        tests = record.get("tests", {})
        lines += [f"Measured on **{record.get('device')}**, torch {record.get('torch')}, "
                  f"commit `{(record.get('commit') or '?')[:10]}`, {record.get('date')}; CUDA "
                  f"tests: {tests.get('passed')} passed, {tests.get('failed')} failed"
                  + (f" ({len(tests['faults'])} of them faulted, hung or crashed)" if tests.get("faults") else "")
                  + (f", {tests['not_run']} not run" if tests.get("not_run") else "") + "; "
                  f"compute-sanitizer errors: {record.get('sanitizer', {}).get('errors')}.", ""]
    for shape in rows.shapes():
        if rows.lengths(shape, prefill=True):
            lines += shape_table(rows, shape) + [""]
    lines += decode_table(rows)
    lines += selected_table(rows)
    lines += profile_table(record.get("profile") or [])
    lines += ["| target | measured | met |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in targets(rows)]
    return "\n".join(lines) + "\n"


def replace_section(readme: str, text: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"the README has no {BEGIN} ... {END} markers")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return head + BEGIN + "\n" + text + END + tail


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("record", help="record.json from bench/gpu_check.sh, or suite.py --json rows")
    ap.add_argument("--readme", default=None, help="replace the marked section of this README")
    args = ap.parse_args(argv)
    record, rows = load(args.record)
    text = render(record, rows)
    if args.readme:
        with open(args.readme) as f:
            readme = f.read()
        with open(args.readme, "w") as f:
            f.write(replace_section(readme, text))
        print(f"updated {args.readme}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
