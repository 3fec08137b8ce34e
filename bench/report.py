"""What a run leaves behind: results.json (every number), kernels.csv and training.csv
(the same rows, flat), report.md (tables a person reads, each peer's ratio against ours
from the same run) and the plots.

Every output of a CPU run says "CPU smoke" where a reader looks first (report title,
results.json "label", every plot title): those numbers prove the suite runs, they are
not performance.
"""
import csv
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from bench import augmentation  # noqa: E402
from vit.environment import atomic_write  # noqa: E402
from vit.plots import save_figure  # noqa: E402


def _write_text(path: Path, text: str):
    atomic_write(path, lambda tmp: tmp.write_text(text))

OURS_KERNEL = "triton (ours)"
PLOTS = {
    "batch": "kernels_vs_batch_size.png",
    "seq_len": "kernels_vs_seq_len.png",
    "images_per_second": "training_images_per_second.png",
    "accuracy_vs_time": "training_accuracy_vs_time.png",
}
MODE_ORDER = ("forward", "backward", "forward+backward")


def _finite_or_text(value):
    """JSON has no NaN or infinity; a NaN error is a result (a broken kernel), so it is kept as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite_or_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_text(v) for v in value]
    return value


def write_results(results: dict, out_dir: Path):
    _write_text(out_dir / "results.json", json.dumps(_finite_or_text(results), indent=2, allow_nan=False) + "\n")
    # Every row carries the run's label, so a CPU smoke row read out of context still says so.
    label = {"run_label": results["label"]}
    _write_csv(out_dir / "kernels.csv", [{**label, **_flat_kernel_row(r)} for r in results["kernels"]])
    _write_csv(out_dir / "training.csv", [
        {**label, **{k: v for k, v in r.items() if k not in ("accuracy_curve", "epoch_wall_seconds")}}
        for r in results["training"]])


def _flat_kernel_row(row: dict) -> dict:
    flat = {k: v for k, v in row.items() if k not in ("shape", "in_sweeps")}
    flat.update({f"shape_{k}": v for k, v in row["shape"].items()})
    flat["in_sweeps"] = " ".join(row["in_sweeps"])
    return flat


def _write_csv(path: Path, rows: list[dict]):
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------- formats

def _us(ms):
    return "" if ms is None else f"{ms * 1e3:,.3g}" if ms * 1e3 < 100 else f"{ms * 1e3:,.0f}"


def _num(value, digits=3):
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return f"{value:,.{digits}g}" if abs(value) < 10 ** digits else f"{value:,.0f}"


def _pct(value):
    return "" if value is None else f"{100 * value:.1f}%"


def _duration(seconds):
    if seconds is None:
        return ""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def _bytes(n):
    return "" if n is None else f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- report.md

def write_report(results: dict, out_dir: Path):
    label = results["label"]
    smoke = results["smoke"]
    lines = [f"# ViT on CIFAR-10: kernels and end-to-end training — {label}", ""]
    if smoke:
        lines += ["> **CPU smoke.** These numbers come from a CPU run at tiny sizes, with Triton through its "
                  "interpreter. They prove that every code path of the benchmark runs and writes its outputs; "
                  "they are **not performance numbers** and say nothing about any GPU.", ""]
    env = results["versions"]
    commit = results["commit"]
    peaks = results["peaks"]
    lines += [
        f"- device: **{results['device']}**"
        + (f" ({', '.join(f'{k} {v}' for k, v in results['device_properties'].items())})"
           if results.get("device_properties") else ""),
        f"- commit: `{commit['commit']}`" + (" (working tree differs from it: "
                                              f"{', '.join(commit.get('changed_files', [])[:12])})" if commit.get("dirty") else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if v),
        f"- command: `{' '.join(results['command'])}`",
        f"- started {results['started']}; took {_duration(results['elapsed_seconds'])} of a "
        f"{_duration(results['budget_seconds'])} budget",
        f"- measured peaks (same run): matmul {_num(peaks.get('matmul_tflops'))} TFLOP/s "
        f"({peaks.get('matmul_dtype')}, {'x'.join(map(str, peaks.get('matmul_shape', [])))}), copy "
        f"{_num(peaks.get('copy_gbps'))} GB/s",
        f"- kernels in {results['settings']['kernel_dtype']}; timing: {results['settings']['timing']}",
        "",
    ]
    if results.get("phase_errors"):
        lines += ["## Phases that failed", ""] + [f"- **{e['phase']}**: {e['error']}" for e in results["phase_errors"]] + [""]
    lines += ["## What the budget trimmed", ""]
    lines += ([f"- {t['what']}: {t['why']}" for t in results["trimmed"]] or ["Nothing: every measurement ran."]) + [""]

    lines += _kernel_section(results)
    lines += _sweep_section(results)
    lines += _training_section(results)
    lines += _augmentation_section(results)
    lines += _skipped_section(results)
    lines += ["## How to read this", "",
              "Kernel times are per call: the median, and the 20th-80th percentile range. TFLOP/s and GB/s divide "
              "each op's FLOPs and its minimum DRAM traffic (formulas in bench/kernels.py) by the median. "
              "\"Compute floor\" and \"memory floor\" are the time the op would take at the matmul peak and the copy "
              "bandwidth measured in this run, divided by the measured time: 100% means at that floor. "
              "\"Peer / ours\" is the peer's median divided by ours at the same op, mode and shape: above 1, ours is "
              "faster. Max abs error compares the forward output (forward), all input gradients (backward), or both "
              "with the torch reference in float64 on fresh random inputs. Training numbers are steady-state (after "
              "warm-up and compile) unless marked; see bench/README.md.", ""]
    _write_text(out_dir / "report.md", "\n".join(lines) + "\n")


def _kernel_section(results: dict) -> list[str]:
    rows = [r for r in results["kernels"] if "model" in r["in_sweeps"]]
    if not rows:
        return ["## Kernels", "", "No kernel measurements.", ""]
    shape = rows[0]["shape"]
    heading = "Kernels at the --quick base shape (not the model's)" if results["quick"] else "Kernels at the model's shape"
    out = [f"## {heading}", "",
           f"B={shape['batch']}, N={shape['seq_len']}, C={shape['dim']}, {shape['heads']} heads of {shape['head_dim']}, "
           f"MLP {shape['mlp_dim']}, {rows[0]['dtype']}.", ""]
    ours = {(r["op"], r["mode"]): r for r in rows if r["provider"] == OURS_KERNEL and r["status"] == "ok"}
    for op in dict.fromkeys(r["op"] for r in rows):
        table = []
        op_rows = [r for r in rows if r["op"] == op]
        # A provider skipped in every mode gets one row, not three copies of its reason.
        skipped_everywhere = [p for p in dict.fromkeys(r["provider"] for r in op_rows)
                              if all(r["status"] != "ok" for r in op_rows if r["provider"] == p)]
        for mode in MODE_ORDER:
            for r in (r for r in op_rows if r["mode"] == mode and r["provider"] not in skipped_everywhere):
                if r["status"] != "ok":
                    table.append([mode, r["provider"], f"{r['status']}: {r['skipped_reason']}"] + [""] * 8)
                    continue
                mine = ours.get((op, mode))
                ratio = ("1 (ours)" if r["provider"] == OURS_KERNEL else
                         f"{r['median_ms'] / mine['median_ms']:.3g}x" if mine else "ours skipped")
                table.append([mode, r["provider"], _us(r["median_ms"]), f"{_us(r['p20_ms'])}–{_us(r['p80_ms'])}",
                              _num(r["tflops"]), _num(r["gbps"]), _pct(r["compute_floor_fraction"]),
                              _pct(r["memory_floor_fraction"]), _num(r["max_error"], 2), ratio,
                              "" if r.get("compile_seconds") is None else f"{r['compile_seconds']:.0f}"])
        for provider in skipped_everywhere:
            first = next(r for r in op_rows if r["provider"] == provider)
            table.append(["all", provider, f"{first['status']}: {first['skipped_reason']}"] + [""] * 8)
        out += [f"### {op}", "", _table(
            ["mode", "provider", "median µs", "p20–p80 µs", "TFLOP/s", "GB/s", "compute floor", "memory floor",
             "max abs err", "peer / ours", "compile s"], table), ""]
    return out


def _sweep_section(results: dict) -> list[str]:
    out = ["## Kernel sweeps", "",
           f"![kernel time against batch size]({PLOTS['batch']})", "",
           f"![kernel time against sequence length]({PLOTS['seq_len']})", ""]
    rows = [r for r in results["kernels"] if r["status"] == "ok" and r["mode"] == "forward+backward"]
    for sweep, axis in (("batch", "batch"), ("seq_len", "seq_len")):
        points = sorted({r["shape"][axis] for r in rows if sweep in r["in_sweeps"]})
        if len(points) < 2:
            continue
        for op in dict.fromkeys(r["op"] for r in rows):
            providers = list(dict.fromkeys(r["provider"] for r in rows if r["op"] == op and sweep in r["in_sweeps"]))
            lookup = {(r["provider"], r["shape"][axis]): r for r in rows if r["op"] == op and sweep in r["in_sweeps"]}
            table = [[p] + [_us(lookup[(p, x)]["median_ms"]) if (p, x) in lookup else "–" for x in points]
                     for p in providers]
            name = "batch size" if axis == "batch" else "sequence length"
            out += [f"{op}, forward+backward median µs against {name}:", "",
                    _table(["provider"] + [f"{'B' if axis == 'batch' else 'N'}={x}" for x in points], table), ""]
    return out


def _training_section(results: dict) -> list[str]:
    rows = results["training"]
    settings = results["settings"]["training"]
    if not rows:
        return ["## End-to-end training", "", "No training measurements.", ""]
    ours = {r["compile"]: r for r in rows if r["model"] == "ours" and r["backend"] == "triton"
            and not r["cuda_graphs"] and r["status"] == "ok"}
    model = settings["model"]
    out = ["## End-to-end training", "",
           f"ViT dim {model['dim']}, depth {model['depth']}, {model['heads']} heads, MLP {model['mlp_dim']}, patch "
           f"{model['patch_size']}; batch {settings['batch_size']}; {settings['epochs']} epoch(s) at most; "
           f"augmentation on the {settings['augment']} path; {settings['data_note']}. "
           f"Steady state after {settings['warmup_steps']} warm-up steps. \"ours / this\" is the triton backend's "
           f"images/s with the same compile setting divided by this row's.", ""]
    table = []
    for r in rows:
        if r["status"] != "ok":
            table.append([r["name"], f"{r['status']}: {r['skipped_reason']}"] + [""] * 8)
            continue
        mine = ours.get(r["compile"])
        ratio = ("1 (ours)" if mine is r else
                 f"{mine['images_per_second'] / r['images_per_second']:.3g}x" if mine else "ours skipped")
        note = f"stopped after {r['steps_run']} steps (budget)" if r["stopped_early"] else f"{r['steps_run']} steps"
        table.append([r["name"], _num(r["images_per_second"], 4), _num(r["epoch_seconds"]), _pct(r["test_acc"]),
                      _pct(r["data_wait_share"]), _bytes(r["peak_memory"]) or "n/a (CPU)",
                      _duration(r["projected_200_epoch_seconds"]), _duration(r["overhead_seconds"]), ratio, note])
    out += [_table(["configuration", "images/s", "epoch s", "test acc", "data wait", "peak memory",
                    "200 epochs (projected)", "one-time overhead", "ours / this", "steps"], table), "",
            f"![images per second]({PLOTS['images_per_second']})", "",
            f"![test accuracy against wall-clock]({PLOTS['accuracy_vs_time']})", ""]
    published = results["published_runs"]
    projection = [[r["name"], _duration(r["projected_200_epoch_seconds"])]
                  + [f"{p['seconds'] / r['projected_200_epoch_seconds']:.3g}x" for p in published]
                  for r in rows if r["status"] == "ok"]
    out += ["### The full recipe (200 epochs), projected from this run", "",
            "Published runs of the reference implementation: "
            + "; ".join(f"{_duration(p['seconds'])} on the {p['gpu']} ({p['test_acc']:.2%} test accuracy)" for p in published)
            + ". The ratios are published time / projected time: above 1, faster than that run.", "",
            _table(["configuration", "projected"] + [f"vs {p['gpu']} ({_duration(p['seconds'])})" for p in published],
                   projection), ""]
    return out


def _augmentation_section(results: dict) -> list[str]:
    rows = results.get("augmentation", [])
    if not rows:
        return ["## Augmentation alone", "", "No augmentation measurements.", ""]
    table = []
    for r in rows:
        if r["status"] != "ok":
            table.append([str(r["batch_size"]), f"failed: {r['error']}", "", ""])
            continue
        table.append([str(r["batch_size"]), f"{_us(r['median_ms'])} ({_us(r['p20_ms'])}-{_us(r['p80_ms'])})",
                      _num(r["images_per_second"], 4),
                      "yes" if r["images_per_second"] >= augmentation.TARGET_IMAGES_PER_SECOND else "no"])
    out = ["## Augmentation alone", "",
           "Crop, flip, per-sample AutoAugment and normalization of one batch of uint8 images already on the "
           "device (`vit/augment.py`, what the GPU loader does each step), median and p20-p80. Target: "
           f"{augmentation.TARGET_IMAGES_PER_SECOND:,} images/s at batch {augmentation.TARGET_BATCH_SIZE} "
           "on an H100.", "",
           _table(["batch", "time per batch, µs", "images/s", f"≥ {augmentation.TARGET_IMAGES_PER_SECOND:,}/s"],
                  table), ""]
    batch_size = results["settings"]["training"]["batch_size"]
    share = augmentation.step_share(rows, results["training"], batch_size)
    if share is None:
        out += [f"Share of a triton-backend training step at batch {batch_size}: not available "
                "(no triton training row or no augmentation timing at that batch size).", ""]
    else:
        value, name = share
        out += [f"One batch of {batch_size} costs **{value:.1%}** of a training step of `{name}` measured above "
                f"(target under {augmentation.TARGET_STEP_SHARE:.0%}).", ""]
    return out


def _skipped_section(results: dict) -> list[str]:
    skipped = {}
    for r in results["kernels"]:
        if r["status"] != "ok":
            skipped.setdefault(f"kernel {r['op']} / {r['provider']}", set()).add(f"{r['status']}: {r['skipped_reason']}")
    for r in results["training"]:
        if r["status"] != "ok":
            skipped.setdefault(f"training {r['name']}", set()).add(f"{r['status']}: {r['skipped_reason']}")
    if not skipped:
        return []
    return ["## Everything skipped or failed, with the reason", ""] + [
        f"- {what}: {'; '.join(sorted(reasons))}" for what, reasons in skipped.items()] + [""]


# ------------------------------------------------------------------------------------ plots

def write_plots(results: dict, out_dir: Path) -> list[str]:
    label = results["label"]
    _plot_sweep(results, "batch", "batch size", out_dir / PLOTS["batch"], label)
    _plot_sweep(results, "seq_len", "sequence length (tokens)", out_dir / PLOTS["seq_len"], label)
    _plot_images_per_second(results, out_dir / PLOTS["images_per_second"], label)
    _plot_accuracy(results, out_dir / PLOTS["accuracy_vs_time"], label)
    return list(PLOTS.values())


def _plot_sweep(results, sweep, axis_name, path, label):
    rows = [r for r in results["kernels"] if r["status"] == "ok" and sweep in r["in_sweeps"]]
    ops = list(dict.fromkeys(r["op"] for r in results["kernels"])) or ["(none)"]
    fig, axes = plt.subplots(len(ops), len(MODE_ORDER), figsize=(5 * len(MODE_ORDER), 3.8 * len(ops)), squeeze=False,
                             layout="constrained")
    for i, op in enumerate(ops):
        for j, mode in enumerate(MODE_ORDER):
            ax = axes[i][j]
            selected = [r for r in rows if r["op"] == op and r["mode"] == mode]
            for provider in dict.fromkeys(r["provider"] for r in selected):
                points = sorted((r["shape"][sweep], r["median_ms"] * 1e3, r["p20_ms"] * 1e3, r["p80_ms"] * 1e3)
                                for r in selected if r["provider"] == provider)
                x, median, p20, p80 = zip(*points)
                style = dict(linewidth=2.5, zorder=3) if provider == OURS_KERNEL else dict(linewidth=1.3)
                line, = ax.plot(x, median, "o-", label=provider, markersize=3, **style)
                ax.fill_between(x, p20, p80, color=line.get_color(), alpha=0.2)
            if not selected:
                ax.text(0.5, 0.5, "no measurements\n(trimmed or skipped)", ha="center", va="center",
                        transform=ax.transAxes)
            else:
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                values = sorted({r["shape"][sweep] for r in selected})
                ax.set_xticks(values, [str(v) for v in values])  # the measured sizes, not powers of 2
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
                ax.legend(fontsize=7)
            ax.set(title=f"{op}, {mode}", xlabel=axis_name, ylabel="time per call (µs), p20–p80 band")
            ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Kernel time against {axis_name} — {label}", fontsize=13)
    save_figure(fig, path, dpi=110)


def _plot_images_per_second(results, path, label):
    rows = results["training"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(4, len(rows)) + 1))
    names = [r["name"] for r in rows][::-1]
    values = [r["images_per_second"] or 0 for r in rows][::-1]
    colors = ["tab:orange" if r["backend"] == "triton" and r["model"] == "ours" else "tab:blue" for r in rows][::-1]
    bars = ax.barh(names, values, color=colors)
    top = max(values) if any(values) else 1
    for bar, r in zip(bars, rows[::-1]):
        text = f"{r['images_per_second']:,.0f}" if r["status"] == "ok" else f"{r['status']}: {r['skipped_reason']}"[:70]
        ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
    ax.set_xlim(0, top * 1.6)
    ax.set(xlabel="training images per second, steady state (orange: our triton backend)",
           title=f"Training throughput — {label}")
    ax.grid(alpha=0.3, axis="x")
    save_figure(fig, path, dpi=110)


def _plot_accuracy(results, path, label):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    drawn = False
    for r in results["training"]:
        if r["status"] == "ok" and r["accuracy_curve"]:
            seconds, accuracy = zip(*r["accuracy_curve"])
            ax.plot(seconds, [100 * a for a in accuracy], "o-", label=r["name"], markersize=4)
            drawn = True
    if drawn:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training measurements", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="wall-clock seconds since training began (compile included)", ylabel="test accuracy (%)",
           title=f"Test accuracy against time — {label}")
    ax.grid(alpha=0.3)
    save_figure(fig, path, dpi=110)
