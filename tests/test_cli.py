"""The command lines' rule (vit/cli.py): every bad flag, path or file is one line on stderr
that names the culprit, exit code 2 for usage and 1 for a failed run, never a traceback unless
--debug; --help shows every flag with its help and default and ends with examples that parse;
the README's commands parse; warnings once at start; the final lines of a run."""
import argparse
import csv
import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from conftest import write_cifar_folder
from vit import cli
from vit.trainer import TrainConfig, Trainer

REPO = Path(train.__file__).resolve().parent
TINY = ["--device", "cpu", "--depth", "1", "--dim", "32", "--heads", "2", "--mlp-dim", "32", "--no-progress",
        "--batch-size", "20", "--warmup-epochs", "0.5"]


def run_train(argv, capsys) -> tuple[int, str, str]:
    """train.main in this process: (exit code, stdout, stderr). An exception escaping main
    would fail the test, as a traceback would on the command line."""
    try:
        code = train.main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, expected_code, fragments):
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_cifar_folder(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """A one-epoch run, finished; cases copy it before breaking it."""
    run = tmp_path_factory.mktemp("runs") / "finished"
    assert train.main(TINY + ["--epochs", "1", "--data-dir", str(data_dir), "--out-dir", str(run)]) == 0
    return run


def copy_run(run: Path, to: Path) -> Path:
    to.mkdir()
    for path in run.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


# Each case: (setup(tmp_path, run, data_dir) -> extra flags, exit code, what the line must name).
def truncated_last_pt(tmp, run, data):
    run = copy_run(run, tmp / "run")
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:500])
    return ["--resume", run], ["last.pt"]


def broken_config(tmp, run, data):
    run = copy_run(run, tmp / "run")
    (run / "config.json").write_text('{"model": {"dim": 32,')
    return ["--resume", run], [f"{run / 'config.json'}: unreadable"]


def empty_config(tmp, run, data):
    run = copy_run(run, tmp / "run")
    (run / "config.json").write_text("")
    return ["--resume", run], ["config.json is empty", "start it again as a new run"]


def not_a_run(tmp, run, data):
    (tmp / "somewhere").mkdir()
    return ["--resume", tmp / "somewhere"], ["--resume", "no config.json"]


def resume_longer(tmp, run, data):
    return ["--resume", copy_run(run, tmp / "run"), "--epochs", "5"], ["start a new run with --epochs 5"]


def out_dir_is_a_file(tmp, run, data):
    (tmp / "file").write_text("")
    return TINY + ["--data-dir", data, "--out-dir", tmp / "file"], [f"--out-dir {tmp / 'file'}", "is a file"]


def out_dir_under_a_file(tmp, run, data):
    (tmp / "file").write_text("")
    return TINY + ["--data-dir", data, "--out-dir", tmp / "file" / "run"], [f"{tmp / 'file'} is a file"]


def out_dir_not_writable(tmp, run, data):
    # sysfs refuses new directories to everyone, root included (a chmod would not stop root).
    return TINY + ["--data-dir", data, "--out-dir", "/sys/vit-run"], ["--out-dir /sys/vit-run", "cannot create it"]


def out_dir_not_empty(tmp, run, data):
    (tmp / "run").mkdir()
    (tmp / "run" / "notes.txt").write_text("mine")
    return TINY + ["--data-dir", data, "--out-dir", tmp / "run"], ["exists and is not empty"]


def batch_larger_than_the_data(tmp, run, data):  # 100 training images in the generated set
    return TINY + ["--data-dir", data, "--out-dir", tmp / "run", "--batch-size", "60000"], \
        ["--batch-size 60000", "100 training images"]


def hostile_data_file(tmp, run, data):
    import os
    import pickle

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {tmp / 'payload-ran'}",)

    folder = write_cifar_folder(tmp / "data")
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": Payload()}))
    return TINY + ["--data-dir", folder, "--out-dir", tmp / "run"], ["data_batch_3: not a CIFAR-10 file"]


def truncated_data_file(tmp, run, data):
    folder = write_cifar_folder(tmp / "data")
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:100])
    return TINY + ["--data-dir", folder, "--out-dir", tmp / "run"], ["test_batch: truncated or corrupt"]


def flags(*extra, names):
    return lambda tmp, run, data: (TINY + ["--data-dir", data, "--out-dir", tmp / "run", *extra], names)


BAD_INPUTS = [
    ("lr-zero", flags("--lr", "0", names=["--lr", "positive"]), 2),
    ("lr-inf", flags("--lr", "inf", names=["--lr", "inf"]), 2),
    ("lr-nan", flags("--lr", "nan", names=["--lr", "nan"]), 2),
    ("min-lr-above-lr", flags("--lr", "0.01", "--min-lr", "0.1", names=["--min-lr 0.1 is above --lr 0.01"]), 2),
    ("epochs-zero", flags("--epochs", "0", names=["--epochs", "positive"]), 2),
    ("epochs-not-a-number", flags("--epochs", "ten", names=["--epochs", "'ten'"]), 2),
    ("warmup-nan", flags("--warmup-epochs", "nan", names=["--warmup-epochs"]), 2),
    ("dropout-one", flags("--dropout", "1", names=["--dropout", "below 1"]), 2),
    ("label-smoothing", flags("--label-smoothing", "1.5", names=["--label-smoothing"]), 2),
    ("seed-negative", flags("--seed", "-1", names=["--seed"]), 2),
    ("heads", flags("--heads", "3", names=["--heads 3 does not divide --dim 32"]), 2),
    ("image-size", flags("--image-size", "64", names=["--image-size 64", "32x32"]), 2),
    ("num-classes", flags("--num-classes", "5", names=["--num-classes 5"]), 2),
    ("triton-head-dim", flags("--backend", "triton", "--dim", "48", "--heads", "2", names=["--backend triton", "24"]), 2),
    ("device-name", flags("--device", "gpu", names=["--device", "'gpu'"]), 2),
    ("cuda-graph", flags("--cuda-graph", names=["--cuda-graph"]), 2),
    ("out-dir-is-a-file", out_dir_is_a_file, 2),
    ("out-dir-under-a-file", out_dir_under_a_file, 2),
    ("out-dir-not-writable", out_dir_not_writable, 2),
    ("out-dir-not-empty", out_dir_not_empty, 2),
    ("batch-larger-than-the-data", batch_larger_than_the_data, 2),
    ("resume-not-a-run", not_a_run, 2),
    ("resume-longer", resume_longer, 2),
    ("resume-truncated-last-pt", truncated_last_pt, 1),
    ("resume-broken-config", broken_config, 1),
    ("resume-empty-config", empty_config, 1),
    ("hostile-data-file", hostile_data_file, 1),
    ("truncated-data-file", truncated_data_file, 1),
]


@pytest.mark.parametrize("setup, code", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_culprit(setup, code, tmp_path, finished_run, data_dir, capsys):
    argv, names = setup(tmp_path, finished_run, data_dir)
    result = run_train(argv, capsys)
    assert_one_line_error(result[0], result[2], code, names)
    assert not (tmp_path / "payload-ran").exists()
    if "--resume" not in argv:  # a run that failed before it started leaves no directory behind
        assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize("argv, code, names", [
    (["--lr", "0"], 2, ["--lr"]),
    (["--device", "gpu"], 2, ["--device"]),
], ids=["usage", "device"])
def test_the_script_itself_prints_no_traceback(argv, code, names):
    result = subprocess.run([sys.executable, "train.py", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_one_line_error(result.returncode, result.stderr, code, names)


def test_the_command_lines_start_without_importing_torchvision():
    """torchvision's import takes about a second (it imports torch._dynamo): only augmenting a
    training batch and reading an image to predict need it, not a usage error or --help."""
    probe = ("import sys, train, vit.evaluate, vit.predict; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torchvision', 'timm')))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout


def test_a_failed_run_from_the_script_is_one_line_and_debug_shows_the_traceback(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "last.pt").write_bytes(b"not a checkpoint")
    command = [sys.executable, "train.py", "--resume", str(run)]
    quiet = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert_one_line_error(quiet.returncode, quiet.stderr, 1, ["cannot resume", "last.pt"])
    loud = subprocess.run(command + ["--debug"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert loud.returncode == 1 and "Traceback" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == quiet.stderr.strip()


def test_an_unexpected_error_says_so_and_how_to_see_it(data_dir, tmp_path, monkeypatch, capsys):
    def broken_fit(self):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(Trainer, "fit", broken_fit)
    argv = TINY + ["--epochs", "1", "--data-dir", data_dir, "--out-dir", tmp_path / "run"]
    code, _, err = run_train(argv, capsys)
    assert_one_line_error(code, err, 1, ["ZeroDivisionError: division by zero", "--debug"])
    monkeypatch.setenv("VIT_DEBUG", "1")
    code, _, err = run_train(argv[:-1] + [tmp_path / "run2"], capsys)
    assert code == 1 and "Traceback" in err and "broken_fit" in err


@pytest.mark.parametrize("module, argv, names", [
    ("vit.evaluate", ["RUN", "--batch-size", "0"], ["--batch-size", "positive"]),
    ("vit.evaluate", ["RUN", "--device", "tpu"], ["--device", "'tpu'"]),
    ("vit.predict", ["RUN", "IMAGE", "--device", "gpu"], ["--device", "'gpu'"]),
    ("vit.predict", ["RUN"], ["IMAGE"]),
    ("bench.run", ["--device", "gpu"], ["--device", "'gpu'"]),
    ("bench.run", ["--budget-seconds", "-3"], ["--budget-seconds", "positive"]),
    ("bench.run", ["--max-files", "2"], ["--max-files", "at least"]),
    ("bench.session", ["step3", "OUT"], ["step", "'step3'"]),
    ("bench.session", ["step1", "OUT", "--seconds", "inf"], ["--seconds", "finite"]),
], ids=["evaluate-batch-size", "evaluate-device", "predict-device", "predict-no-image", "bench-device",
        "bench-budget", "bench-max-files", "session-step", "session-seconds"])
def test_evaluate_predict_and_bench_usage_errors(module, argv, names, finished_run, tmp_path, capsys):
    argv = [str(finished_run) if a == "RUN" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(argv)
    assert_one_line_error(exit_.value.code, capsys.readouterr().err, 2, names)


def test_evaluate_out_dir_that_is_a_file_is_one_line(finished_run, tmp_path, capsys):
    from vit import evaluate

    (tmp_path / "file").write_text("")
    code = evaluate.main([str(finished_run), "--out-dir", str(tmp_path / "file" / "eval")])
    assert_one_line_error(code, capsys.readouterr().err, 1, ["--out-dir", f"{tmp_path / 'file'} is a file"])


# --- help -----------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["train", "vit.evaluate", "vit.predict", "bench.run", "bench.session"])
def test_help_shows_every_flag_with_its_help_and_default_and_ends_with_examples(module):
    parser = importlib.import_module(module).build_parser()
    text = parser.format_help()
    formatter = parser._get_formatter()
    for action in parser._actions:
        assert action.help and action.help is not argparse.SUPPRESS, action.dest
        if action.option_strings and action.dest != "help":
            assert all(option in text for option in action.option_strings)
            assert "default" in formatter._get_help_string(action), action.option_strings
    for shown in ("(default: True)", "(default: False)", "(default: None)"):
        assert shown not in " ".join(text.split()), shown
    examples = [line.strip() for line in text.split("\nexamples:\n")[1].splitlines()
                if line.strip().startswith(("python ", "torchrun "))]
    assert len(examples) >= 2
    for example in examples:
        parser.parse_args(arguments_after(module, shlex.split(example)))


def arguments_after(module: str, words: list[str]) -> list[str]:
    """The arguments of `python train.py ...`, `python -m vit.evaluate ...`, `torchrun ... train.py ...`."""
    target = {"train": "train.py", "bench.run": "bench"}.get(module, module)
    return words[words.index(target) + 1:]


def test_train_help_names_each_flag_once_with_the_values_users_asked_for():
    text = " ".join(train.build_parser().format_help().split())
    assert "--progress, --no-progress a live progress bar (default: on)" in text
    assert "--epochs EPOCHS passes over the training set" in text and "(default: 200)" in text
    assert "--label-smoothing LABEL_SMOOTHING label smoothing" in text and "(default: 0.1)" in text


def readme_commands() -> list[str]:
    """Every command line in the README's code blocks, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def test_readme_commands_run_without_an_activated_venv_and_parse():
    checked = 0
    for command in readme_commands():
        words = shlex.split(command)
        while words and "=" in words[0] and not words[0].startswith("-"):
            words = words[1:]  # VAR=value prefixes
        assert words[0] not in ("python", "python3"), f"needs an activated venv: {command}"
        if words[:2] == ["make", "train"]:
            args = shlex.split(next((w for w in words if w.startswith("ARGS=")), "ARGS=")[5:])
            module = "train"
        elif "train.py" in words:
            module, args = "train", arguments_after("train", words)
        elif "-m" in words and words[words.index("-m") + 1] in ("vit.evaluate", "vit.predict"):
            module = words[words.index("-m") + 1]
            args = arguments_after(module, words)
        else:
            continue
        importlib.import_module(module).build_parser().parse_args(args)
        checked += 1
    assert checked >= 5


# --- warnings and the lines around a run -----------------------------------------------------

def test_startup_warnings():
    cfg = TrainConfig(epochs=2, warmup_epochs=5, batch_size=128, train_subset=60_000, device="cpu")
    warnings = train.startup_warnings(cfg, set(), num_images=50_000, steps_per_epoch=3)
    assert len(warnings) == 3
    assert "--warmup-epochs 5 is not shorter than --epochs 2" in warnings[0]
    assert "--train-subset 60000 is more than the 50,000 training images" in warnings[1]
    assert "only 3 steps of 128 images per epoch" in warnings[2]
    sensible = TrainConfig(epochs=200, warmup_epochs=5, device="cpu")
    assert train.startup_warnings(sensible, set(), num_images=50_000, steps_per_epoch=390) == []


def test_a_run_warns_once_prints_its_seed_and_ends_with_its_summary(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = TINY + ["--epochs", "2", "--warmup-epochs", "2", "--seed", "7", "--batch-size", "50",
                   "--data-dir", data_dir, "--out-dir", run]
    code, out, err = run_train(argv, capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err  # warmup as long as the run; 2 steps per epoch
    assert any("--warmup-epochs 2 is not shorter than --epochs 2" in w for w in warnings)
    assert f"run directory {run}; seed 7" in out
    with open(run / "metrics.csv", newline="") as f:
        accuracies = [float(row["test_acc"]) for row in csv.DictReader(f)]
    best = accuracies.index(max(accuracies))
    lines = out.strip().splitlines()[-4:]
    assert lines[0] == (f"best test accuracy {accuracies[best]:.2%} at epoch {best + 1} of 2; "
                        f"last epoch {accuracies[-1]:.2%}")
    assert re.fullmatch(r"wall time (\d+h )?(\d+m )?\d+s; [\d,]+ training images/s", lines[1]), lines[1]
    assert str(run) in lines[2] and str(run / "curves.png") in lines[2]
    assert lines[3].startswith("evaluate it again: ")
    evaluate = shlex.split(lines[3].removeprefix("evaluate it again: "))
    assert evaluate[1:] == ["-m", "vit.evaluate", str(run)]
    result = subprocess.run([sys.executable, *evaluate[1:]], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_validators_refuse_what_cannot_train():
    fraction, seed = cli.bounded(float, "fraction"), cli.bounded(int, "seed")
    for check, bad in [(cli.positive_float, ["0", "-1", "inf", "nan", "x"]), (cli.positive_int, ["0", "1.5", "-3"]),
                       (cli.bounded(float, "non_negative"), ["-0.1", "inf", "nan"]), (fraction, ["1", "-0.1", "nan"]),
                       (seed, ["-1", str(2**63)]), (cli.bounded(int, "non_negative"), ["-1", "two"])]:
        for text in bad:
            with pytest.raises(argparse.ArgumentTypeError):
                check(text)
    assert cli.positive_float("1e-3") == 1e-3 and fraction("0") == 0 and seed(str(2**63 - 1)) == 2**63 - 1
    assert cli.device("cpu") == torch.device("cpu") and cli.device("auto").type in ("cpu", "cuda")
