"""What a run says: report.md (tables a person reads, the headline comparisons first, each
peer's ratio against ours from the same run), the CSV tables, and the plots.

The labels that keep numbers honest are on every output where a reader looks first (the
report's title and banners, results.json's "label", every CSV row, every plot title):
"CPU smoke" for a CPU run (the numbers prove the suite runs; they are not performance),
"synthetic images" when the training rows ran on random images (throughput valid, accuracy
meaningless), INCOMPLETE while a run is still going or was stopped, and FAILED for any
measurement of our own code that crashed or gave wrong results.
"""
import csv
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

from bench import augmentation  # noqa: E402
from bench.kernels import OURS  # noqa: E402

PLOTS = {  # in the order they get a file of their own when --max-files is tight
    "images_per_second": "training_images_per_second.png",
    "batch": "kernels_vs_batch_size.png",
    "accuracy_vs_time": "training_accuracy_vs_time.png",
    "seq_len": "kernels_vs_seq_len.png",
}
MODE_ORDER = ("forward", "backward", "forward+backward")
HEADLINE_MODE = "forward+backward"


def finite_or_text(value):
    """JSON has no NaN or infinity; a NaN error is a result (a broken kernel), so it is kept as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: finite_or_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_text(v) for v in value]
    return value


# ---------------------------------------------------------------------------------- CSV

def kernels_csv(results: dict) -> str:
    label = {"run_label": results["label"]}
    return _csv([{**label, **_flat_kernel_row(r)} for r in results["kernels"]])


def training_csv(results: dict) -> str:
    label = {"run_label": results["label"], "data": results["data"]["kind"] if results.get("data") else ""}
    rows = []
    for r in results["training"]:
        flat = {k: v for k, v in r.items() if k not in ("accuracy_curve", "epoch_wall_seconds", "counts")}
        flat.update({f"count_{k}": v for k, v in (r.get("counts") or {}).items() if k not in ("note", "model")})
        rows.append({**label, **flat})
    return _csv(rows)


def _flat_kernel_row(row: dict) -> dict:
    flat = {k: v for k, v in row.items() if k not in ("shape", "in_sweeps")}
    flat.update({f"shape_{k}": v for k, v in row["shape"].items()})
    flat["in_sweeps"] = " ".join(row["in_sweeps"])
    return flat


def _csv(rows: list[dict]) -> str:
    text = io.StringIO()
    columns = list(dict.fromkeys(k for row in rows for k in row))
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


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


def duration(seconds):
    if seconds is None:
        return ""
    if seconds >= 3600:
        return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"
    if seconds >= 60:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{seconds:.1f} s"


def _bytes(n):
    return "" if n is None else f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def _ratio(peer_ms, ours_ms):
    return f"{peer_ms / ours_ms:.3g}x"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _not_ok(row: dict) -> str:
    word = "FAILED" if row["status"] == "failed" else row["status"]
    owner = f" ({row['owner']})" if row["status"] == "failed" else ""
    return f"{word}{owner}: {row['skipped_reason']}"


def ours_failures(results: dict) -> list[str]:
    """Every measurement of our own code that crashed or gave wrong results, and every phase
    that crashed: any of these makes the run exit non-zero."""
    out = [f"kernel {r['op']} {r['mode']} {r['provider']} at B={r['shape']['batch']} N={r['shape']['seq_len']}: "
           f"{r['skipped_reason']}" for r in results["kernels"] if r["status"] == "failed" and r["owner"] == "ours"]
    out += [f"training {r['name']}: {r['skipped_reason']}" for r in results["training"]
            if r["status"] == "failed" and r["owner"] == "ours"]
    out += [f"augmentation batch {r['batch_size']}: {r['error']}" for r in results.get("augmentation", [])
            if r["status"] == "failed"]
    out += [f"phase {e['phase']}: {e['error']}" for e in results.get("phase_errors", [])]
    return out


# ---------------------------------------------------------------------------------- report.md

def report_markdown(results: dict, files: dict) -> str:
    """files: {"standalone": [names beside report.md], "archive": name, "archived": [names in it]}."""
    label = results["label"]
    lines = [f"# ViT on CIFAR-10: kernels and end-to-end training — {label}", ""]
    lines += _banners(results)
    env, commit, peaks, data = results["versions"], results["commit"], results["peaks"], results.get("data")
    lines += [
        f"- device: **{results['device']}**"
        + (f" ({', '.join(f'{k} {v}' for k, v in results['device_properties'].items())})"
           if results.get("device_properties") else ""),
        f"- commit: `{commit['commit']}`" + (f" ({commit['source']})" if commit.get("source") else "")
        + (" (working tree differs from it: " f"{', '.join(commit.get('changed_files', [])[:12])})"
           if commit.get("dirty") else ""),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in env.items() if v),
        f"- command: `{' '.join(results['command'])}`",
        f"- started {results['started']}; {duration(results['elapsed_seconds'])} of a "
        f"{duration(results['budget_seconds'])} budget so far" if not results["complete"] else
        f"- started {results['started']}; took {duration(results['elapsed_seconds'])} of a "
        f"{duration(results['budget_seconds'])} budget",
        "- phases done: " + (", ".join(results["phases_done"]) or "none yet")
        + (f"; running: {results['phase_running']}" if results.get("phase_running") else ""),
        "- data: " + (f"**{data['note']}** ({data['train_images']:,} training and {data['test_images']:,} test "
                      f"images)" if data else "none (no training phase)"),
        f"- torch.compile: {results['settings']['compile_policy']}",
    ]
    if peaks:
        lines.append(f"- measured peaks (same run): matmul {_num(peaks.get('matmul_tflops'))} TFLOP/s "
                     f"({peaks.get('matmul_dtype')}, {'x'.join(map(str, peaks.get('matmul_shape', [])))}), copy "
                     f"{_num(peaks.get('copy_gbps'))} GB/s")
    lines += [f"- kernels in {results['settings']['kernel_dtype']}; timing: {results['settings']['timing']}", ""]
    lines += _headline_section(results)
    lines += ["## What the budget trimmed", ""]
    lines += ([f"- {t['what']}: {t['why']}" for t in results["trimmed"]] or ["Nothing so far: every measurement ran."]) + [""]
    lines += _kernel_section(results)
    lines += _training_section(results, files)
    lines += _augmentation_section(results)
    lines += _sweep_section(results, files)
    lines += _skipped_section(results)
    lines += _files_section(files)
    lines += ["## How to read this", "",
              "Kernel times are per call: the median, and the 20th-80th percentile range. TFLOP/s and GB/s divide "
              "each op's FLOPs and its minimum DRAM traffic (formulas in bench/kernels.py) by the median. "
              "\"Compute floor\" and \"memory floor\" are the time the op would take at the matmul peak and the copy "
              "bandwidth measured in this run, divided by the measured time: 100% means at that floor. "
              "\"Peer / ours\" is the peer's median divided by ours at the same op, mode and shape: above 1, ours is "
              "faster. Max abs error compares the forward output (forward), all input gradients (backward), or both "
              "with the torch reference in float64 on fresh random inputs. Every compiled row names its "
              "torch.compile mode; its compile time is in the \"compile s\" column (kernels) or the one-time overhead "
              "(training). Training numbers are steady-state (after warm-up and compile) unless marked; the test "
              "accuracy column says what each number is. See bench/README.md.", ""]
    return "\n".join(lines) + "\n"


def _banners(results: dict) -> list[str]:
    out = []
    if results["smoke"]:
        out += ["> **CPU smoke.** These numbers come from a CPU run at tiny sizes, with Triton through its "
                "interpreter. They prove that every code path of the benchmark runs and writes its outputs; "
                "they are **not performance numbers** and say nothing about any GPU.", ""]
    data = results.get("data")
    if data and not data["accuracy_valid"]:
        out += [f"> **Synthetic images.** The training rows ran on {data['source']}: images/s, step times and "
                "the projections are valid (every op runs on every image whatever its pixels); **test accuracy is "
                "meaningless** (chance level) and is not reported as a result.", ""]
    if not results["complete"]:
        running = f" while running {results['phase_running']}" if results.get("phase_running") else ""
        out += [f"> **INCOMPLETE.** Written after the phases done so far{running}; a run stopped here (killed, or "
                "out of time) leaves these numbers, which are valid as far as they go.", ""]
    failures = ours_failures(results)
    if failures:
        out += ["> **FAILED.** Our own code failed here (the run exits non-zero):", ">"]
        out += [f"> - {line}" for line in failures] + [""]
    return out


def _kernel_rows(results, op, mode, shape_key="model"):
    return [r for r in results["kernels"] if r["op"] == op and r["mode"] == mode and shape_key in r["in_sweeps"]]


def _headline_section(results: dict) -> list[str]:
    out = ["## Headline", "",
           "The comparisons the project is judged by, from this run, at the model's shape"
           + (" (--quick: a tiny stand-in shape)" if results["quick"] else "") + ". Ratios are peer time / ours: "
           "above 1, ours is faster.", ""]
    items = []
    # 1. Attention: ours against SDPA's fastest backend.
    rows = _kernel_rows(results, "attention", HEADLINE_MODE)
    ours = next((r for r in rows if r["provider"] == OURS), None)
    sdpa = sorted((r for r in rows if r["provider"].startswith("sdpa") and r["status"] == "ok"),
                  key=lambda r: r["median_ms"])
    if ours is None:
        items.append("attention, ours against SDPA's fastest backend: not measured (no kernel phase)")
    elif ours["status"] != "ok":
        items.append(f"attention, ours against SDPA's fastest backend: ours {_not_ok(ours)}")
    elif not sdpa:
        items.append("attention, ours against SDPA's fastest backend: no SDPA backend ran here (see the table)")
    else:
        best = sdpa[0]
        items.append(f"attention forward+backward: ours {_us(ours['median_ms'])} µs, SDPA's fastest backend here "
                     f"({best['provider']}) {_us(best['median_ms'])} µs: **{_ratio(best['median_ms'], ours['median_ms'])}**")
    # 2. Ours against torch.compile of the reference, per op, and the whole step against torch bf16 + compile.
    for op in ("attention", "layernorm_mlp"):
        rows = _kernel_rows(results, op, HEADLINE_MODE)
        ours = next((r for r in rows if r["provider"] == OURS), None)
        compiled = next((r for r in rows if r["provider"].startswith("torch.compile")), None)
        if ours is None or compiled is None:
            items.append(f"{op}, ours against torch.compile: not measured (no kernel phase)")
        elif ours["status"] != "ok" or compiled["status"] != "ok":
            bad = ours if ours["status"] != "ok" else compiled
            items.append(f"{op}, ours against {compiled['provider']}: {bad['provider']} {_not_ok(bad)}")
        else:
            items.append(f"{op} forward+backward: ours {_us(ours['median_ms'])} µs, {compiled['provider']} "
                         f"{_us(compiled['median_ms'])} µs (compiled in {compiled['compile_seconds']:.0f}s): "
                         f"**{_ratio(compiled['median_ms'], ours['median_ms'])}**")
    # 3. The whole training step.
    training = {r["key"]: r for r in results["training"]}
    mine = next((r for k, r in training.items() if k == "triton"), None)
    if mine is None:
        items.append("whole training step: not measured (no training phase, or not among --training-configs)")
    elif mine["status"] != "ok":
        items.append(f"whole training step: {mine['name']} {_not_ok(mine)}")
    else:
        parts = [f"whole training step (the loader's batch included), {mine['name']}: {mine['step_ms']:.3g} ms, "
                 f"{mine['images_per_second']:,.0f} images/s"]
        for key in ("torch-bf16-compile", "torch-bf16", "timm-bf16"):
            peer = training.get(key)
            if peer is None:
                continue
            if peer["status"] != "ok":
                parts.append(f"{peer['name']} {_not_ok(peer)}")
            else:
                mode = f" (mode {peer['compile_mode']})" if peer["compile_mode"] else ""
                parts.append(f"{peer['name']}{mode} {peer['step_ms']:.3g} ms: "
                             f"**{_ratio(peer['step_ms'], mine['step_ms'])}**")
        items.append("; ".join(parts))
        items.append(f"the full recipe (200 epochs) with {mine['name']}, projected from this run: "
                     f"**{duration(mine['projected_200_epoch_seconds'])}** (steady epoch "
                     f"{mine['epoch_seconds']:.3g} s + evaluation {mine['eval_seconds']:.3g} s + host work "
                     f"{mine['host_work_seconds']:.3g} s, times 200, plus {mine['overhead_seconds']:.3g} s once)")
    return out + [f"{i}. {item}" for i, item in enumerate(items, 1)] + [""]


def _kernel_section(results: dict) -> list[str]:
    rows = [r for r in results["kernels"] if "model" in r["in_sweeps"]]
    if not rows:
        return ["## Kernels", "", "No kernel measurements.", ""]
    shape = rows[0]["shape"]
    heading = "Kernels at the --quick base shape (not the model's)" if results["quick"] else "Kernels at the model's shape"
    out = [f"## {heading}", "",
           f"B={shape['batch']}, N={shape['seq_len']}, C={shape['dim']}, {shape['heads']} heads of {shape['head_dim']}, "
           f"MLP {shape['mlp_dim']}, {rows[0]['dtype']}. \"owner\": ours (our kernels, our reference) or a peer.", ""]
    ours = {(r["op"], r["mode"]): r for r in rows if r["provider"] == OURS and r["status"] == "ok"}
    for op in dict.fromkeys(r["op"] for r in rows):
        table = []
        op_rows = [r for r in rows if r["op"] == op]
        # A provider not run in any mode gets one row, not three copies of its reason.
        not_run = [p for p in dict.fromkeys(r["provider"] for r in op_rows)
                   if all(r["status"] != "ok" for r in op_rows if r["provider"] == p)]
        for mode in MODE_ORDER:
            for r in (r for r in op_rows if r["mode"] == mode and r["provider"] not in not_run):
                if r["status"] != "ok":
                    table.append([mode, r["provider"], r["owner"], _not_ok(r)] + [""] * 8)
                    continue
                mine = ours.get((op, mode))
                ratio = ("1 (ours)" if r["provider"] == OURS else
                         _ratio(r["median_ms"], mine["median_ms"]) if mine else "ours not measured")
                table.append([mode, r["provider"], r["owner"], _us(r["median_ms"]),
                              f"{_us(r['p20_ms'])}–{_us(r['p80_ms'])}", _num(r["tflops"]), _num(r["gbps"]),
                              _pct(r["compute_floor_fraction"]), _pct(r["memory_floor_fraction"]),
                              _num(r["max_error"], 2), ratio,
                              "" if r.get("compile_seconds") is None else f"{r['compile_seconds']:.0f}"])
        for provider in not_run:
            first = next(r for r in op_rows if r["provider"] == provider)
            table.append(["all", provider, first["owner"], _not_ok(first)] + [""] * 8)
        out += [f"### {op}", "", _table(
            ["mode", "provider", "owner", "median µs", "p20–p80 µs", "TFLOP/s", "GB/s", "compute floor",
             "memory floor", "max abs err", "peer / ours", "compile s"], table), ""]
    return out


def _sweep_section(results: dict, files: dict) -> list[str]:
    if "sweeps" not in results["phases_done"]:
        return []
    out = ["## Kernel sweeps", ""] + [_picture(PLOTS[k], t, files) for k, t in
                                      (("batch", "kernel time against batch size"),
                                       ("seq_len", "kernel time against sequence length"))] + [""]
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


def _picture(name: str, title: str, files: dict) -> str:
    if name in files["standalone"]:
        return f"![{title}]({name})\n"
    if name in files["archived"]:
        return f"{title}: `{name}` in `{files['archive']}`\n"
    return f"{title}: not drawn\n"


def _accuracy_cell(r: dict) -> str:
    if not r["accuracy_valid"]:
        return "n/a (synthetic)"
    return f"{_pct(r['test_acc'])} ({r['accuracy_note']})"


def _training_section(results: dict, files: dict) -> list[str]:
    rows = results["training"]
    settings = results["settings"]["training"]
    if not rows:
        return ["## End-to-end training", "", "No training measurements.", ""]
    mine = next((r for r in rows if r["key"] == "triton" and r["status"] == "ok"), None)
    model = settings["model"]
    data = results["data"]
    out = ["## End-to-end training", "",
           f"ViT dim {model['dim']}, depth {model['depth']}, {model['heads']} heads, MLP {model['mlp_dim']}, patch "
           f"{model['patch_size']}; batch {settings['batch_size']}; {settings['epochs']} epoch(s) at most; "
           f"augmentation batched on the device; **{data['note']}**. Steady state after "
           f"{settings['warmup_steps']} warm-up steps; a step includes the loader's batch. \"ours / this\" is the "
           f"step time of this row divided by that of our triton backend, eager "
           f"({mine['name'] if mine else 'not measured'}): above 1, ours is faster.", ""]
    table = []
    for r in rows:
        mode = r["compile_mode"] or ("eager" if not r["compile"] else "")
        if r["status"] != "ok":
            table.append([r["name"], r["owner"], mode, _not_ok(r)] + [""] * 10)
            continue
        ratio = "1 (ours)" if r is mine else _ratio(r["step_ms"], mine["step_ms"]) if mine else "ours not measured"
        steps = f"stopped after {r['steps_run']} (budget)" if r["stopped_early"] else str(r["steps_run"])
        table.append([r["name"], r["owner"], mode, _num(r["images_per_second"], 4), _num(r["step_ms"]),
                      _num(r["epoch_seconds"]), _accuracy_cell(r), _pct(r["data_wait_share"]),
                      _bytes(r["peak_memory"]) or "n/a (CPU)", _num(r["host_work_seconds"]),
                      duration(r["projected_200_epoch_seconds"]), duration(r["overhead_seconds"]), ratio, steps])
    out += [_table(["configuration", "owner", "compile mode", "images/s", "step ms", "epoch s", "test acc (what it is)",
                    "data wait", "peak memory", "host work s/epoch", "200 epochs (projected)",
                    "one-time overhead (compile, warm-up)", "ours / this", "steps"], table), "",
            _picture(PLOTS["images_per_second"], "images per second", files),
            _picture(PLOTS["accuracy_vs_time"], "test accuracy against wall-clock", files)
            if data["accuracy_valid"] else "Test accuracy against time: not drawn (synthetic images).\n", ""]
    out += _counts_section(rows)
    host = results.get("host_work")
    published = results["published_runs"]
    ok = [r for r in rows if r["status"] == "ok"]
    out += ["### The full recipe (200 epochs), projected from this run", "",
            "Projected = one-time overhead + 200 × (steady epoch + evaluation of the 10,000 test images + per-epoch "
            "host work at that epoch length: the gap between epochs, plus any part of the background write that "
            "outlasts the epoch). " + (f"Host work measured in this run: {host['note']}." if host
                                       else "Host work: not measured (no configuration ran).")
            + " Published runs of the reference implementation: "
            + "; ".join(f"{duration(p['seconds'])} on the {p['gpu']} ({p['test_acc']:.2%} test accuracy)" for p in published)
            + ". The ratios are published time / projected time: above 1, faster than that run.", ""]
    if ok:
        out += [_table(["configuration", "projected"] + [f"vs {p['gpu']} ({duration(p['seconds'])})" for p in published],
                       [[r["name"], duration(r["projected_200_epoch_seconds"])]
                        + [f"{p['seconds'] / r['projected_200_epoch_seconds']:.3g}x" for p in published] for r in ok]), ""]
    return out


def _counts_section(rows: list[dict]) -> list[str]:
    counted = [r for r in rows if r["status"] == "ok" and r.get("counts")]
    if not counted:
        return []
    note = next((r["counts"]["note"] for r in counted if "note" in r["counts"]), "")
    table = [[r["name"], c["error"]] + [""] * 7 if "error" in c else
             [r["name"], str(c["launches_per_step"]), str(c["aten_launches_per_step"]),
              str(c["triton_launches_per_step"]), str(c["syncs_per_step"]), str(c["host_to_device_copies_per_step"]),
              str(c["syncs_in_counted_epoch"]), _num(c["loader_launches_per_image"]),
              _num(c["launches_per_step_with_loader"], 4)]
             for r in counted for c in [r["counts"]]]
    return ["### Device work per training step (eager configurations)", "",
            f"The same on every machine for the same precision: {note}. Targets (issue 12): triton eager at most 200 "
            "launches per step, 0 syncs per step, at most 0.05 augmentation launches per image, at most 20 ms of host "
            "work between epochs (the projection below gives the measured gap). A step captured with --cuda-graph is "
            "one graph replay plus the copies of its inputs: a GPU figure, not counted here (the dispatcher does not "
            "see the launches a replay makes).", "",
            _table(["configuration", "launches/step", "aten", "Triton", "syncs/step", "host-to-device copies/step",
                    "syncs in the counted epoch", "loader launches/image", "launches/step with the loader"], table), ""]


def _augmentation_section(results: dict) -> list[str]:
    rows = results.get("augmentation", [])
    if not rows:
        return []
    table = []
    for r in rows:
        if r["status"] != "ok":
            table.append([str(r["batch_size"]), f"FAILED: {r['error']}", "", ""])
            continue
        table.append([str(r["batch_size"]), f"{_us(r['median_ms'])} ({_us(r['p20_ms'])}-{_us(r['p80_ms'])})",
                      _num(r["images_per_second"], 4),
                      "yes" if r["images_per_second"] >= augmentation.TARGET_IMAGES_PER_SECOND else "no"])
    out = ["## Augmentation alone", "",
           "Crop, flip, per-sample AutoAugment and normalization of one batch of uint8 images already on the "
           "device (`vit/augment.py`, what the train loader does each step), median and p20-p80, on random images "
           "(every op runs on every image: the time does not depend on pixels). Target: "
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
            skipped.setdefault(f"kernel {r['op']} / {r['provider']}", set()).add(_not_ok(r))
    for r in results["training"]:
        if r["status"] != "ok":
            skipped.setdefault(f"training {r['name']}", set()).add(_not_ok(r))
    if not skipped:
        return []
    return ["## Everything skipped or failed, with the reason", ""] + [
        f"- {what}: {'; '.join(sorted(reasons))}" for what, reasons in skipped.items()] + [""]


def _files_section(files: dict) -> list[str]:
    return ["## Files", "",
            f"Beside this report: {', '.join(files['standalone'])}. In `{files['archive']}`: "
            f"{', '.join(files['archived'])}.", ""]


# ------------------------------------------------------------------------------------ plots

def plots_for(results: dict, phase: str) -> dict:
    """name -> PNG bytes of the plots that the phase just done can draw."""
    out = {}
    label = results["label"]
    if phase == "sweeps":
        out[PLOTS["batch"]] = _plot_sweep(results, "batch", "batch size", label)
        out[PLOTS["seq_len"]] = _plot_sweep(results, "seq_len", "sequence length (tokens)", label)
    if phase == "training" and results["training"]:
        out[PLOTS["images_per_second"]] = _plot_images_per_second(results, label)
        if results["data"]["accuracy_valid"]:
            out[PLOTS["accuracy_vs_time"]] = _plot_accuracy(results, label)
    return out


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return buffer.getvalue()


def _plot_sweep(results, sweep, axis_name, label) -> bytes:
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
                style = dict(linewidth=2.5, zorder=3) if provider == OURS else dict(linewidth=1.3)
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
    return _png(fig)


def _plot_images_per_second(results, label) -> bytes:
    rows = results["training"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * max(4, len(rows)) + 1))
    names = [r["name"] + (f" ({r['compile_mode']})" if r["compile_mode"] else "") for r in rows][::-1]
    values = [r["images_per_second"] or 0 for r in rows][::-1]
    colors = ["tab:orange" if r["backend"] == "triton" and r["model"] == "ours" else "tab:blue" for r in rows][::-1]
    bars = ax.barh(names, values, color=colors)
    top = max(values) if any(values) else 1
    for bar, r in zip(bars, rows[::-1]):
        text = f"{r['images_per_second']:,.0f}" if r["status"] == "ok" else _not_ok(r)[:70]
        ax.text(bar.get_width() + top * 0.01, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
    ax.set_xlim(0, top * 1.6)
    ax.set(xlabel="training images per second, steady state (orange: our triton backend)",
           title=f"Training throughput — {label}")
    ax.grid(alpha=0.3, axis="x")
    return _png(fig)


def _plot_accuracy(results, label) -> bytes:
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
           title=f"Test accuracy against time (short rows, not the recipe's accuracy) — {label}")
    ax.grid(alpha=0.3)
    return _png(fig)
