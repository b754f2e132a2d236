"""Turn pytest-benchmark JSON files into a Markdown table and a PNG.

    python bench/report.py results.json [more.json ...] --md out.md --png out.png

The Markdown is headed by the machine (GPU name, or CPU model and cores), the torch and
triton versions, the date and commit, and the command that produced the JSON (each
command, when several files are merged: e.g. the groups of one ``bench/gpu_run.sh``
run); then a summary (speedup vs dense by k for every backward series), on a GPU a table
of GPU time beside the host time of launching the same call, and one row per case with
its speed target, if it has one, and whether it was met. The PNG plots speedup vs dense
against k, one panel per mode and gradient kind, one line per backend, shape and dtype.
Every number comes from the JSON; nothing is extrapolated.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict
from datetime import datetime


def _load(path: str) -> dict:
    """A ``--benchmark-json`` file, or the JSON-lines record of a run cut short
    (``*.partial.jsonl``, bench/conftest.py ``PARTIAL_ENV``: a first line with the
    machine, commit and date, then one finished case a line; a last line cut off in the
    middle is dropped)."""
    with open(path) as f:
        if not path.endswith(".jsonl"):
            return json.load(f)
        data: dict = {"benchmarks": []}
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "benchmark" in rec:
                data["benchmarks"].append(rec["benchmark"])
            else:
                data.update(rec)
        return data


def merge(datas: list[dict], names: list[str] | None = None) -> dict:
    """One report's data from several JSON files: the first file's machine and date, the
    cases of all of them in order, and every file's command. Files from different
    machines are refused (their numbers do not belong in one table)."""
    if not datas:
        raise ValueError("no JSON files to report")
    names = names or [f"file {i + 1}" for i in range(len(datas))]
    first = datas[0]
    if len(datas) == 1:
        return first
    machines = {machine_line(d) for d in datas}
    if len(machines) > 1:
        raise SystemExit(
            "the JSON files come from different machines, report them separately: "
            + "; ".join(f"{n}: {machine_line(d)}" for n, d in zip(names, datas))
        )
    merged = dict(first)
    merged["benchmarks"] = [b for d in datas for b in d.get("benchmarks", [])]
    merged["commands"] = [
        (n, d.get("machine_info", {}).get("meprop", {}).get("command")) for n, d in zip(names, datas)
    ]
    return merged


def machine_line(data: dict) -> str:
    mi = data.get("machine_info", {})
    me = mi.get("meprop", {})
    gpu = me.get("gpu")
    if gpu:
        return f"{gpu['name']} (sm_{gpu['capability'].replace('.', '')}, {gpu['count']} GPU)"
    cpu = me.get("cpu_model") or mi.get("cpu", {}).get("brand_raw") or mi.get("processor") or "cpu"
    cores = me.get("cpu_count") or mi.get("cpu", {}).get("count")
    threads = me.get("torch_threads")
    return f"{cpu}, {cores} cores, {threads} torch threads (no GPU)"


def header(data: dict) -> list[str]:
    mi = data.get("machine_info", {})
    me = mi.get("meprop", {})
    ci = data.get("commit_info", {})
    when = data.get("datetime", "")
    try:
        when = datetime.fromisoformat(when.replace("Z", "+00:00")).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        pass
    commit = ci.get("id") or "?"
    commit = commit[:10] + (" (uncommitted changes)" if ci.get("dirty") else "")
    if ci.get("commit_file"):
        commit += f"; bench/COMMIT, written with the tree sent, says {ci['commit_file'][:10]}"
    lines = [
        f"**Machine:** {machine_line(data)}  ",
        f"**Software:** torch {me.get('torch', '?')}, triton {me.get('triton', '?')}, "
        f"Python {mi.get('python_version', '?')}, {me.get('platform', mi.get('system', ''))}  ",
        f"**Date:** {when}; commit {commit}  ",
    ]
    if data.get("commands"):
        lines.append("**Commands** (one JSON file each):  ")
        lines += [f"- `{name}`: `{cmd or '?'}`" for name, cmd in data["commands"]]
        lines.append("")
    elif me.get("command"):
        lines.append(f"**Command:** `{me['command']}`  ")
    if me.get("loadavg_at_start") or me.get("loadavg_at_end"):
        start, end = me.get("loadavg_at_start"), me.get("loadavg_at_end")
        fmt = lambda la: "/".join(f"{x:.2f}" for x in la) if la else "?"  # noqa: E731
        lines.append(f"**Load average (1/5/15 min):** {fmt(start)} at start, {fmt(end)} at end  ")
    return lines


def fmt_time(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def fmt_field(v) -> str:
    """A case's field as a table cell: ``-`` where the case has none (an LSTM case has no
    backend, gradient kind or dtype field)."""
    return "-" if v is None else str(v)


def fmt_shape(shape, name, e: dict | None = None) -> str:
    if shape and len(shape) == 3:
        return f"{shape[0]} x {shape[1]}->{shape[2]}"
    if shape and len(shape) > 3:
        return f"MLP {'-'.join(map(str, shape[1:]))}, batch {shape[0]}"
    e = e or {}
    if "hidden" in e:  # the LSTM cases give their sizes as fields
        return (f"LSTM {e.get('input_size')}->{e.get('hidden')}, batch {e.get('batch')}, "
                f"{e.get('steps')} steps")
    return name or "-"


def fmt_k(e: dict) -> str:
    k, frac = e.get("k"), e.get("k_frac")
    if frac is None or frac >= 1:
        return "all" if frac is not None else str(k)
    return f"{k} ({frac * 100:.3g}%)"


def fmt_mem(b) -> str:
    if b is None:
        return None
    return f"{b / 2**20:.1f} MiB"


def notes(e: dict) -> str:
    parts = []
    names = {"torch": "torch path", "topk": "torch.topk", "compacted": "compacted G[:, S]",
             "triton_gemms": "Triton GEMMs"}
    for key, value in e.items():
        if key.startswith("speedup_vs_") and key != "speedup_vs_dense" and value is not None:
            if isinstance(value, (int, float)):
                other = key.removeprefix("speedup_vs_")
                parts.append(f"{value:.2f}x vs {names.get(other, other)}")
    if e.get("overhead_us") is not None:
        parts.append(
            f"forward {e['meprop_forward_us']:.1f} us vs {e['dense_forward_us']:.1f} us: "
            f"+{e['overhead_us']:.1f} us per call"
        )
    if e.get("optimizer"):  # training-step cases only
        parts.append(e["optimizer"])
    if e.get("share_of_backward") is not None:
        parts.append(f"{e['share_of_backward'] * 100:.1f}% of its backward")
    if e.get("paper_table7"):
        p = e["paper_table7"]
        paper = f"paper (GTX 1080): dense {p['dense_ms']:g} ms"
        if p.get("meprop_ms") is not None:
            paper += f", meProp {p['meprop_ms']:g} ms ({p['speedup']:g}x)"
        parts.append(paper)
    if e.get("device_type") == "cuda":
        if e.get("host_launch_us") is not None:
            through = e.get("host_launch_us_triton_path")
            parts.append(f"host {e['host_launch_us']:.0f} us per call"
                         + ("" if through is None else f" ({through:.0f} us through Triton's launch path)"))
        if e.get("tflops") is not None and e.get("flops"):
            parts.append(f"{e['tflops']:.1f} TFLOP/s")
        elif e.get("gb_s") is not None:
            parts.append(f"{e['gb_s']:.0f} GB/s")
        if e.get("roofline_share") is not None:
            parts.append(f"{e['roofline_share'] * 100:.0f}% of roofline")
        if e.get("peak_mem_bytes") is not None:
            parts.append(f"peak {fmt_mem(e['peak_mem_bytes'])}")
    return "; ".join(parts)


def training_table(data: dict) -> list[str]:
    """Whole training steps (forward + backward + optimizer) and the forward overhead."""
    lines = []
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if b["group"].startswith("train-step") and e.get("mode") != "dense" and e.get("speedup_vs_dense") is not None:
            after = ""
            if e.get("pretrain_steps") is not None:
                kept = "flushed" if e.get("flush_denormals") else "kept"
                after = (f", after {e['pretrain_steps']} steps, denormals {kept} (in Adam's state: "
                         f"meProp {e.get('denormal_share_meprop', 0) * 100:.1f}%, dense "
                         f"{e.get('denormal_share_dense', 0) * 100:.1f}%)")
            if e.get("host_launch_us") is not None and e.get("dense_host_launch_us") is not None:
                after += (f"; host time per step, dense / meProp: {e['dense_host_launch_us'] / 1e3:.2f} / "
                          f"{e['host_launch_us'] / 1e3:.2f} ms")
            if e.get("eager_loop_speedup_vs_dense") is not None:
                after += (f"; an eager loop's step, dense / meProp: {e['dense_eager_loop_us'] / 1e3:.2f} / "
                          f"{e['eager_loop_us'] / 1e3:.2f} ms ({fmt_x(e['eager_loop_speedup_vs_dense'])})")
            label, k = fmt_shape(e['shape'], None), f"k={e.get('k')}"
            if e.get("model"):  # a real model (bench/test_bench_zoo_step.py): its name, tokens, and each half
                label = f"{e['shape_name']}, {e['shape'][0]} tokens"
                if e.get("k_ffn") is not None:
                    hidden, ffn = e["shape"][1:3]
                    k = f"k={e['k_requested']:g} ({e['k']} of {hidden}, {e['k_ffn']} of {ffn})"
                if e.get("meprop_backward_ms") is not None:
                    after += (f"; dense / meProp forward {e['dense_forward_ms']:.1f} / {e['meprop_forward_ms']:.1f} ms, "
                              f"backward {e['dense_backward_ms']:.1f} / {e['meprop_backward_ms']:.1f} ms")
            lines.append(
                f"| {label}{after} | {e.get('grad')} | {e.get('optimizer')} | {k} | "
                f"{fmt_time(e.get('dense_median_s'))} | {fmt_time(case_time(b))} | {fmt_x(e['speedup_vs_dense'])} |"
            )
        if b["group"].startswith("forward-") and e.get("overhead_us") is not None:
            lines.append(
                f"| forward {e['shape_name']} ({e['device_type']}) | - | - | - | "
                f"{e['dense_forward_us']:.1f} us | {e['meprop_forward_us']:.1f} us | +{e['overhead_us']:.1f} us |"
            )
    if not lines:
        return []
    return [
        "| case | grad | optimizer | k | dense | meProp | speedup (paired) |",
        "|---|---|---|---|---:|---:|---:|",
        *lines,
    ]


def case_time(b: dict) -> float:
    return b["extra_info"].get("time_median_s", b["stats"]["median"])


def rows(data: dict) -> list[dict]:
    order = {}
    out = []
    for b in data["benchmarks"]:
        e = b["extra_info"]
        order.setdefault(b["group"], len(order))
        out.append({"group": b["group"], "e": e, "t": case_time(b), "name": b["name"]})
    out.sort(key=lambda r: (
        order[r["group"]],
        r["e"].get("backend") != "dense",
        r["e"].get("backend", ""),
        r["e"].get("mode", ""),
        r["e"].get("grad", ""),
        r["e"].get("k_frac") or 0,
    ))
    return out


def fmt_target(e: dict) -> str:
    """``speedup_vs_dense >= 2: met`` (or NOT MET), one entry per target of the case
    (``bench/targets.py`` records them); empty for a case without one."""
    target = e.get("target")
    if not target:
        return ""
    parts = []
    for t in target if isinstance(target, list) else [target]:
        bound = f">= {t['least']:g}" if t.get("least") is not None else f"<= {t['most']:g}"
        met = t.get("met", e.get("target_met"))
        value = t.get("value")
        got = f" ({value:.4g})" if isinstance(value, (int, float)) else ""
        parts.append(f"{t['metric']} {bound}: {'met' if met else '**NOT MET**'}{got}")
    return "; ".join(parts)


def targets_table(data: dict) -> list[str]:
    """Every case with a target: what it had to reach, what it measured, met or not."""
    lines = []
    for r in rows(data):
        if r["e"].get("target"):
            lines.append(f"| `{r['name']}` | {fmt_target(r['e'])} |")
    if not lines:
        return []
    return ["| case | target: result (measured) |", "|---|---|", *lines]


def gpu_table(data: dict) -> list[str]:
    """CUDA backward cases: GPU time (CUDA events) beside the host time of one eager call
    (launching it, no synchronize), for meProp and for dense."""
    lines = []
    for r in rows(data):
        e = r["e"]
        if e.get("device_type") != "cuda" or "host_launch_us" not in e:
            continue
        if not (r["group"].startswith("backward-") or r["group"].startswith("triton-gather-")):
            continue
        dense_host = e.get("dense_host_launch_us")
        loop = e.get("eager_loop_us")
        lines.append(
            f"| {fmt_shape(e.get('shape', []), None, e)} | {e.get('dtype')} | {e.get('backend')} | "
            f"{e.get('mode')} | {fmt_k(e)} | {fmt_time(r['t'])} | {e['host_launch_us']:.1f} us | "
            f"{fmt_time(e.get('dense_median_s'))} | "
            f"{'-' if dense_host is None else f'{dense_host:.1f} us'} | {fmt_x(e.get('speedup_vs_dense'))} | "
            f"{'-' if loop is None else f'{loop:.1f} us'} | {fmt_x(e.get('eager_loop_speedup_vs_dense'))} |"
        )
    if not lines:
        return []
    return [
        "| shape | dtype | backend | mode | k | GPU time | host launch | dense GPU time "
        "| dense host launch | speedup vs dense | eager loop, per call | eager loop speedup |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *lines,
    ]


def case_table(data: dict) -> list[str]:
    lines = [
        "| group | backend | mode | grad | shape | k | dtype | median time | dense, same test "
        "| speedup vs dense | target | notes |",
        "|---|---|---|---|---|---|---|---:|---:|---:|---|---|",
    ]
    for r in rows(data):
        e = r["e"]
        lines.append(
            f"| {r['group']} | {fmt_field(e.get('backend'))} | {fmt_field(e.get('mode'))} | {fmt_field(e.get('grad'))} | "
            f"{fmt_shape(e.get('shape', []), e.get('shape_name'), e)} | {fmt_k(e)} | {fmt_field(e.get('dtype'))} | "
            f"{fmt_time(r['t'])} | {fmt_time(e.get('dense_median_s'))} | "
            f"{fmt_x(e.get('speedup_vs_dense'))} | {fmt_target(e)} | {notes(e)} |"
        )
    return lines


def _k_key(e: dict):
    """The k a case asked for: a fraction (sorts first, by size) or a number of units."""
    k = e.get("k_requested", e.get("k_frac"))
    return (0, k) if isinstance(k, float) else (1, k)


def _k_label(key) -> str:
    kind, k = key
    return f"k={k * 100:.3g}%" if kind == 0 else f"k={k}"


def series(data: dict):
    """Backward k-sweep series: (mode, grad) -> (backend, shape, dtype) -> [(k_frac, speedup, k key)]."""
    out = defaultdict(lambda: defaultdict(list))
    for b in data["benchmarks"]:
        e = b["extra_info"]
        if not b["group"].startswith("backward-") or e.get("backend") == "dense":
            continue
        if e.get("speedup_vs_dense") is None:
            continue
        label = (e["backend"], fmt_shape(e["shape"], None), e["dtype"])
        out[(e["mode"], e["grad"])][label].append((e["k_frac"], e["speedup_vs_dense"], _k_key(e)))
    for panel in out.values():
        for pts in panel.values():
            pts.sort()
    return out


def summary_table(data: dict) -> list[str]:
    """Speedup vs dense by k: one row per (shape, dtype, backend, mode, grad)."""
    by = series(data)
    keys = sorted({p[2] for panel in by.values() for pts in panel.values() for p in pts})
    if not keys:
        return []
    lines = [
        "| shape | dtype | backend | mode | grad | " + " | ".join(_k_label(k) for k in keys) + " |",
        "|" + "---|" * 5 + "---:|" * len(keys),
    ]
    entries = []
    for (mode, grad), panel in by.items():
        for (backend, shape, dtype), pts in panel.items():
            got = {p[2]: p[1] for p in pts}
            cells = " | ".join(fmt_x(got[k]) if k in got else "" for k in keys)
            entries.append((shape, dtype, backend, mode, grad, cells))
    entries.sort(key=lambda t: (
        t[0], t[1], t[2], MODE_ORDER.index(t[3]) if t[3] in MODE_ORDER else 9, t[4]
    ))
    for shape, dtype, backend, mode, grad, cells in entries:
        lines.append(f"| {shape} | {dtype} | {backend} | {mode} | {grad} | {cells} |")
    return lines


MODE_ORDER = ("unified-topk", "per-example-topk", "unified-random", "per-example-random")


def markdown(data: dict, png: str | None) -> str:
    parts = ["# meprop-triton benchmarks", "", *header(data), ""]
    summary = summary_table(data)
    if summary:
        parts += [
            "## One layer's backward: speedup vs dense `nn.Linear` backward, by k",
            "",
            "Each cell is the median over rounds of `dense time / meProp time`, the two "
            "calls timed back to back in the same round of the same test. k is a share of out_features, or a number of units (the targets' "
            "k=20 and k=80 at the MNIST shape).",
            "",
            *summary,
            "",
        ]
    if png:
        parts += [f"![speedup vs k]({png})", ""]
    training = training_table(data)
    if training:
        parts += [
            "## Whole training steps, and what a meProp layer adds to a forward",
            "",
            "A step is forward, backward and optimizer; both models use the same optimizer. "
            "The forward row is one `MePropLinear` call against one `nn.Linear` call, grad "
            "enabled (its last column: the time it adds, median over rounds of the paired "
            "difference).",
            "",
            *training,
            "",
        ]
    gpu = gpu_table(data)
    if gpu:
        parts += [
            "## GPU: device time and host time of one backward",
            "",
            "`GPU time`: CUDA events around each call, L2 flushed before it, median. `host "
            "launch`: the CPU wall time of one eager call, `perf_counter` around it with no "
            "synchronize between calls (median of 25 in a row): what Python, autograd and the "
            "kernel launches cost. Where it is near or above the GPU time, the GPU waits on "
            "the host (a CUDA graph or torch.compile removes most of that). `eager loop`: the "
            "same 25 calls' wall time per call, the synchronize after the last included: what "
            "an eager training loop sees, about the larger of the two; its speedup is the dense "
            "loop's over the meProp loop's.",
            "",
            *gpu,
            "",
        ]
    targets = targets_table(data)
    if targets:
        parts += [
            "## Speed targets",
            "",
            "Recorded by every case that has one (`bench/targets.py`); an unmet target fails "
            "a run only under `--assert-targets`.",
            "",
            *targets,
            "",
        ]
    parts += [
        "## Every case",
        "",
        "Median time per call (CPU: `time.perf_counter` through pytest-benchmark; GPU: CUDA "
        "events). `speedup vs dense` is the median over rounds of the dense baseline's "
        "time over the case's, the two timed back to back in each round of the same test "
        "(`dense, same test` is that baseline's median); the `dense` rows are timed alone in their own test, so they can differ "
        "from it (caches and the allocator see other work in between when interleaved).",
        "",
        *case_table(data),
        "",
    ]
    return "\n".join(parts)


def plot(data: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = series(data)
    panels = sorted(by, key=lambda mg: (MODE_ORDER.index(mg[0]) if mg[0] in MODE_ORDER else 9, mg[1]))
    if not panels:
        raise NoSeries("no backward k-sweep cases with speedup_vs_dense in the JSON")
    ncols = 2
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 3.6 * nrows), squeeze=False)
    styles = {"float32": "-", "float16": "--", "bfloat16": ":"}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels = sorted({lab for p in panels for lab in by[p]})
    color_of = {}
    for lab in labels:
        color_of.setdefault((lab[0], lab[1]), colors[len(color_of) % len(colors)])
    for ax, (mode, grad) in zip(axes.flat, panels):
        for lab in sorted(by[(mode, grad)]):
            backend, shape, dtype = lab
            pts = by[(mode, grad)][lab]
            xs = [p[0] * 100 for p in pts]
            ys = [p[1] for p in pts]
            ax.plot(xs, ys, styles.get(dtype, "-"), marker="o", ms=3.5,
                    color=color_of[(backend, shape)], label=f"{backend}, {shape}, {dtype}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        lowest = min(p[0] * 100 for lab in by[(mode, grad)] for p in by[(mode, grad)][lab])
        ticks = [t for t in (0.1, 0.2, 0.5) if t >= lowest / 2] + [1, 2, 5, 10, 25, 50]
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}%" for t in ticks])
        ax.set_title(f"{mode}, {grad} gradients", fontsize=10)
        ax.set_xlabel("k (share of out_features)")
        ax.set_ylabel("speedup vs dense backward")
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    me = data.get("machine_info", {}).get("meprop", {})
    fig.suptitle(
        f"meProp backward vs dense nn.Linear backward, timed side by side\n{machine_line(data)}; "
        f"torch {me.get('torch', '?')}, triton {me.get('triton', '?')}; {data.get('datetime', '')[:10]}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


class NoSeries(Exception):
    """Nothing to plot: the JSON holds no backward k-sweep case with a speedup."""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("json", nargs="+", help="pytest --benchmark-json files (one machine)")
    ap.add_argument("--md", help="write the Markdown table here")
    ap.add_argument("--png", help="write the speedup-vs-k plot here")
    args = ap.parse_args(argv)
    data = merge([_load(p) for p in args.json], [os.path.basename(p) for p in args.json])
    if len(args.json) == 1 and not data.get("benchmarks"):
        raise SystemExit(f"{args.json[0]}: no benchmarks in it")
    # The Markdown first, so that a plot that fails or is cut off cannot cost the table.
    if args.md:
        with open(args.md, "w") as f:
            f.write(markdown(data, None))
    png = args.png
    if png:
        try:
            plot(data, png)
        except NoSeries as e:
            print(f"report.py: no PNG written ({e})", file=sys.stderr)
            png = None
        except Exception as e:  # noqa: BLE001 - the table is written; report the plot's failure
            print(f"report.py: no PNG written ({type(e).__name__}: {e})", file=sys.stderr)
            png = None
    text = markdown(data, _relative(png, args.md))
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    else:
        print(text)


def _relative(png: str | None, md: str | None) -> str | None:
    """The PNG's path as the Markdown file should link it."""
    if png is None:
        return None
    if md is None:
        return png
    return os.path.relpath(png, os.path.dirname(os.path.abspath(md)))


if __name__ == "__main__":
    main()
