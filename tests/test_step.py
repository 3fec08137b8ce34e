"""The training step: no host sync inside it, the schedule applied on the device, non-finite values
caught where they start, and the CUDA-graph step (GPU tests) computing what the eager one does."""
import contextlib
import json
import math
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from bench.host_work import MarkedLoader, count_step_work
from vit.checkpoint import load_checkpoint
from vit.data import TrainLoader
from vit.model import ViT, ViTConfig
from vit.optimizer import make_optimizer
from vit import trainer as trainer_module
from vit.trainer import (PROGRESS_EVERY, EvalSet, GraphedStep, NonFiniteLoss, TrainConfig, Trainer,
                         cuda_graph_unsupported_reason, lr_at, lr_schedule, seed_everything)

TINY = ViTConfig(dim=32, depth=1, heads=2, mlp_dim=32)
CLASSES = [str(i) for i in range(10)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def make_trainer(run_dir, model_cfg=TINY, steps=4, batch_size=8, seed=0, wrap=None, planted=None,
                 **cfg_fields) -> Trainer:
    """A trainer over generated images with the batched-augmentation loader. planted: values set on
    the config after its checks, for the trainer's own guards against what a valid config never holds."""
    cfg = TrainConfig(**{"epochs": 2, "batch_size": batch_size, "warmup_epochs": 1, "device": "cpu",
                         "precision": "fp32", "progress": False, "seed": seed, **cfg_fields})
    for name, value in (planted or {}).items():
        setattr(cfg, name, value)
    device = torch.device(cfg.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (steps * batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (steps * batch_size,), generator=generator)
    loader = TrainLoader(images, labels, batch_size, seed, device)
    model = ViT(model_cfg).to(device)
    test_set = EvalSet(images[:16].to(device), labels[:16].to(device), CLASSES)
    return Trainer(model, wrap(loader) if wrap else loader, test_set, make_optimizer(model.parameters(), cfg, device),
                   cfg, run_dir, log=lambda line: None)


# ------------------------------------------------------------------------------- no host in the loop

def test_steps_have_no_host_sync_no_host_data_and_the_same_work_each_time(monkeypatch):
    # Progress points by the step count only: a point due to a slow machine's clock would add work to a step.
    monkeypatch.setattr(trainer_module, "PROGRESS_EVERY_SECONDS", math.inf)
    steps = PROGRESS_EVERY + 3
    counts = count_step_work(TINY, steps=steps, batch_size=2)["steps"]
    for index, step in enumerate(counts):
        assert (step.syncs, step.host_tensors, step.host_to_device_copies, step.device_to_host_copies) == (0, 0, 0, 0), \
            (index, dict(step.by_op))
    # The first step also creates Adam's moments and ends with a progress point, as the PROGRESS_EVERY-th does.
    plain = [c.launches for i, c in enumerate(counts) if i not in (0, PROGRESS_EVERY - 1)]
    assert len(set(plain)) == 1 and plain[0] > 50, plain
    assert counts[PROGRESS_EVERY - 1].launches > plain[0]


def test_the_learning_rate_comes_from_the_schedule_on_the_device(tmp_path):
    trainer = make_trainer(tmp_path, steps=4, epochs=3, warmup_epochs=1.5, lr=2e-3, min_lr=1e-4)
    table = lr_schedule(trainer.cfg, 4)
    assert math.isclose(float(table[0]), lr_at(0, 12, 6, 2e-3, 1e-4), rel_tol=1e-6)
    seen = []  # Adam's learning rate at each ask for a batch: 5 asks per epoch of 4 steps
    trainer.loader = MarkedLoader(trainer.loader, on_ask=lambda: seen.append(trainer.optimizer.param_groups[0]["lr"].item()))
    for epoch in range(3):
        assert math.isclose(trainer.train_epoch(epoch)["lr"], table[4 * epoch + 3], rel_tol=1e-6)
    assert int(trainer.meters.step) == 12
    assert seen[0] == pytest.approx(2e-3)  # make_optimizer's initial value, before any step
    for epoch in range(3):
        for done in range(1, 5):  # after `done` steps of the epoch, the last one's entry of the table
            assert seen[5 * epoch + done] == pytest.approx(float(table[4 * epoch + done - 1]), rel=1e-6)


def test_the_step_equals_adam_stepped_by_hand_through_the_schedule(tmp_path):
    """The device-side schedule (table, step counter, tensor learning rate) against a plain loop that
    sets each step's learning rate from the host: the same weights, bit for bit."""
    trainer = make_trainer(tmp_path, steps=4, epochs=2, warmup_epochs=0.5, lr=3e-3, min_lr=1e-4, weight_decay=1e-3)
    table = lr_schedule(trainer.cfg, 4)
    reference = ViT(TINY)
    reference.load_state_dict(trainer.model.state_dict())
    optimizer = torch.optim.Adam(reference.parameters(), lr=0.0, weight_decay=1e-3, fused=True)
    losses = []
    for epoch in range(2):
        trainer.loader.set_epoch(epoch)
        for step, (images, labels) in enumerate(trainer.loader):
            optimizer.param_groups[0]["lr"] = float(table[epoch * 4 + step])
            loss = torch.nn.functional.cross_entropy(reference(images), labels, label_smoothing=0.1)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    rows = [trainer.train_epoch(epoch) for epoch in range(2)]
    for epoch, row in enumerate(rows):
        assert math.isclose(row["train_loss"], sum(losses[4 * epoch:4 * epoch + 4]) / 4, rel_tol=1e-12)
    for (name, ours), theirs in zip(trainer.model.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(ours, theirs), name


# ------------------------------------------------------------------------------- non-finite values

def poison_at(step: int):
    """A loader wrapper whose batch `step` (1-based, first epoch) holds NaN images."""
    class Poisoned(MarkedLoader):
        def __iter__(self):
            for index, (images, labels) in enumerate(self.inner, 1):
                yield (torch.full_like(images, math.nan) if self.inner.epoch == 0 and index == step else images), labels
    return lambda loader: Poisoned(loader)


def test_a_non_finite_loss_is_reported_with_its_epoch_and_step(tmp_path):
    trainer = make_trainer(tmp_path, steps=5, wrap=poison_at(3))
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at epoch 1, step 3; stopping: no checkpoint was written yet"):
        trainer.fit()
    assert not (tmp_path / "last.pt").exists() and not (tmp_path / "best.pt").exists()


def test_non_finite_weights_are_caught_at_the_step_that_broke_them(tmp_path):
    """An infinite learning rate: the loss of that step is finite, the weights after it are not."""
    trainer = make_trainer(tmp_path, steps=3, min_lr=0.0, planted={"lr": math.inf})
    with pytest.raises(NonFiniteLoss, match=r"non-finite weights after the optimizer step at epoch 1, step 1;"):
        trainer.fit()


def test_a_non_finite_test_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, steps=2, epochs=3)
    evaluate = Trainer.evaluate
    monkeypatch.setattr(Trainer, "evaluate",
                        lambda self: (math.nan, 0.99) if len(self.metrics) == 1 else evaluate(self))
    with pytest.raises(NonFiniteLoss, match=f"non-finite test loss after epoch 2; stopping: the last good checkpoint is {tmp_path / 'last.pt'}"):
        trainer.fit()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1


def test_a_zero_learning_rate_trains_without_dividing_by_it(tmp_path):
    """A schedule with min_lr 0 ends on a step of learning rate 0; here every step has it."""
    trainer = make_trainer(tmp_path, steps=2, epochs=1, min_lr=0.0, planted={"lr": 0.0})
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.fit()
    assert summary.epochs == 1 and summary.best_epoch == 1 and math.isfinite(summary.last_acc)
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_fit_returns_the_run_summary(tmp_path):
    trainer = make_trainer(tmp_path, steps=2, epochs=2)
    summary = trainer.fit()
    accuracies = [row["test_acc"] for row in trainer.metrics]
    assert summary.best_acc == max(accuracies) and accuracies[summary.best_epoch - 1] == summary.best_acc
    assert summary.last_acc == accuracies[-1] and summary.epochs == 2
    assert summary.wall_seconds > 0 and summary.images_per_second > 0


def test_a_resumed_run_drives_its_own_learning_rate_and_ends_as_an_uninterrupted_one(tmp_path):
    dropout = ViTConfig(dim=32, depth=1, heads=2, mlp_dim=32, dropout=0.2)  # the RNG state matters too
    straight = make_trainer(tmp_path / "straight", model_cfg=dropout, steps=3, epochs=2)
    straight.fit()
    first = make_trainer(tmp_path / "resumed", model_cfg=dropout, steps=3, epochs=2)
    first.train_epoch(0)
    first.metrics.append({"epoch": 1, "train_loss": 1.0, "train_acc": 0.1, "test_loss": 1.0, "test_acc": 0.1,
                          "lr": 0.0, "epoch_seconds": 1.0, "images_per_second": 1.0})
    first.best_epoch = 1
    first._save_epoch(1, best=True)
    first.writer.wait()
    resumed = make_trainer(tmp_path / "resumed", model_cfg=dropout, steps=3, epochs=2)
    with torch.no_grad():
        for parameter in resumed.model.parameters():
            parameter.add_(1.0)  # whatever the new process starts with, the checkpoint replaces it
    torch.manual_seed(123)
    resumed.resume()
    assert resumed.start_epoch == 1
    assert resumed.optimizer.param_groups[0]["lr"] is resumed.lr_tensors[0]
    resumed.fit()
    for name, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value), name


def test_resume_hands_the_writer_the_checkpoints_metrics_not_the_list_the_next_epoch_appends_to(tmp_path,
                                                                                                  monkeypatch):
    """resume() rewrites metrics.csv and curves.png on the background writer while fit() trains on
    and appends the next epoch's row. The writer here is held until that row is appended, so it
    reads the list after the append whenever it reads the live list (as it once did: matplotlib
    then got epochs and losses of different lengths)."""
    first = make_trainer(tmp_path, steps=2, epochs=2)
    first.metrics.append({"epoch": 1, "train_loss": 1.0, "train_acc": 0.1, "test_loss": 1.0, "test_acc": 0.1,
                          "lr": 0.0, "epoch_seconds": 1.0, "images_per_second": 1.0})
    first.best_epoch = 1
    first._save_epoch(1, best=True)
    first.writer.wait()
    appended = threading.Event()
    written = []
    write = trainer_module.write_outputs

    def held_write(run_dir, rows):
        assert appended.wait(timeout=600), "the test never appended its row"
        write(run_dir, rows)
        written.append([row["epoch"] for row in rows])

    monkeypatch.setattr(trainer_module, "write_outputs", held_write)
    resumed = make_trainer(tmp_path, steps=2, epochs=2)
    resumed.resume()
    resumed.metrics.append({**resumed.metrics[0], "epoch": 2})
    appended.set()
    resumed.writer.wait()
    assert written == [[1]]
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 2  # the header and epoch 1


def test_epoch_files_are_written_while_the_next_epoch_trains(tmp_path, monkeypatch):
    """The training thread goes on while an epoch's files are written. Checked by order of events,
    never by the clock, so a loaded machine cannot fail it: each epoch's write but the last is
    held until the next epoch has asked for its first batch. A trainer that waited for the write
    before training on would never ask: the held write then gives up at its hang guard and fit()
    raises its error."""
    epochs = 3
    write = trainer_module.write_epoch_files
    started = [threading.Event() for _ in range(epochs)]  # epoch k (from 0) has asked for a batch
    ended, written = [], []

    def held_write(run_dir, state, **kwargs):
        finished = state["epoch"]  # epochs finished, so the index of the next one
        if finished < epochs:
            assert started[finished].wait(timeout=600), f"epoch {finished + 1} never started during the write"
        write(run_dir, state, **kwargs)
        written.append(finished)

    monkeypatch.setattr(trainer_module, "write_epoch_files", held_write)
    trainer = make_trainer(tmp_path, steps=2, epochs=epochs, wrap=lambda loader: MarkedLoader(
        loader, on_ask=lambda: started[len(ended)].set(), on_end=lambda: ended.append(True)))
    trainer.fit()
    assert written == [1, 2, 3] and len(ended) == epochs
    assert (tmp_path / "metrics.csv").exists() and len(trainer.writer.job_seconds) == epochs


def test_an_interrupt_propagates_only_after_the_background_write_is_done(tmp_path, monkeypatch):
    write = trainer_module.write_epoch_files

    def slow_write(*args, **kwargs):
        time.sleep(1.0)  # still writing epoch 1 when epoch 2 is interrupted
        write(*args, **kwargs)

    def interrupt_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return train_epoch(self, epoch)

    train_epoch = Trainer.train_epoch
    monkeypatch.setattr(trainer_module, "write_epoch_files", slow_write)
    monkeypatch.setattr(Trainer, "train_epoch", interrupt_second_epoch)
    trainer = make_trainer(tmp_path, steps=2, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert (tmp_path / "metrics.csv").exists() and not list(tmp_path.glob(".*.tmp"))


# ------------------------------------------------------------------------------- the CUDA-graph step

@pytest.mark.parametrize("fields, device, world_size, reason", [
    ({}, "cpu", 1, "needs a CUDA device"),
    ({}, "cuda", 2, "does not support torchrun"),
    ({"compile": True}, "cuda", 1, "--compile do not combine"),
    ({"precision": "fp16"}, "cuda", 1, "does not support --precision fp16"),
    ({"precision": "bf16"}, "cuda", 1, None),
    ({"precision": "fp32"}, "cuda", 1, None),
], ids=["cpu", "torchrun", "compile", "fp16", "bf16", "fp32"])
def test_cuda_graph_settings_that_cannot_work_are_refused_in_one_line(fields, device, world_size, reason):
    found = cuda_graph_unsupported_reason(TrainConfig(**fields), torch.device(device), world_size)
    assert found is None if reason is None else (reason in found and "\n" not in found)


def test_a_cuda_graph_trainer_on_the_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        make_trainer(tmp_path, cuda_graph=True)


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's fastest convolution backward may accumulate in a different order from run to run."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def per_step_losses(run_dir, steps: int, backend: str, **fields) -> list[float]:
    """The loss of each step of one epoch (read between steps: a test may sync)."""
    sums = []
    trainer = make_trainer(run_dir, model_cfg=ViTConfig(dim=64, depth=2, heads=4, mlp_dim=64, backend=backend),
                           steps=steps, batch_size=32, epochs=1, device="cuda", **fields)
    trainer.loader = MarkedLoader(trainer.loader, on_ask=lambda: sums.append(trainer.meters.loss_sum.item()))
    trainer.train_epoch(0)
    return [after - before for before, after in zip(sums, sums[1:])]


# Our kernels first: the whole-step graph of the triton backend is what the GPU session must see.
GRAPH_BACKENDS = ("triton", "torch")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_graph_step_gives_the_eager_loss_sequence_exactly_at_fp32(tmp_path, deterministic_cudnn, backend):
    eager = per_step_losses(tmp_path / "eager", 20, backend, precision="fp32")
    graphed = per_step_losses(tmp_path / "graph", 20, backend, precision="fp32", cuda_graph=True)
    assert len(eager) == 20 and eager == graphed, (eager, graphed)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", GRAPH_BACKENDS)
def test_graph_step_stays_close_to_the_eager_one_at_bf16(tmp_path, deterministic_cudnn, backend):
    eager = per_step_losses(tmp_path / "eager", 20, backend, precision="bf16")
    graphed = per_step_losses(tmp_path / "graph", 20, backend, precision="bf16", cuda_graph=True)
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-2, atol=0)


@pytest.mark.gpu
@needs_cuda
def test_on_cuda_steps_do_not_sync_and_a_replayed_step_only_copies_its_batch():
    model_cfg = ViTConfig(dim=64, depth=2, heads=4, mlp_dim=64)
    for step in count_step_work(model_cfg, steps=8, device="cuda", precision="bf16")["steps"]:
        assert step.syncs == 0 and step.host_tensors == 0 and step.device_to_host_copies == 0, dict(step.by_op)
    graphed = count_step_work(model_cfg, steps=8, device="cuda", precision="bf16", cfg_overrides={"cuda_graph": True})
    # After the warm-up steps and the capture, a step is two copies into the static inputs and a replay.
    for step in graphed["steps"][5:]:
        assert step.aten_launches == 2 and step.syncs == 0, dict(step.by_op)


WRITE_HANG_GUARD_SECONDS = 600  # far above what a held write waits for in these tests


def held_writes(monkeypatch, epochs: int) -> tuple[list[threading.Event], list]:
    """Each epoch's files are written only once releases[epoch] (1-based) is set, or after
    WRITE_HANG_GUARD_SECONDS; `released` gets (epoch, whether it was released) per write."""
    releases, released = [threading.Event() for _ in range(epochs + 1)], []
    write = trainer_module.write_epoch_files

    def held_write(run_dir, state, **kwargs):
        released.append((state["epoch"], releases[state["epoch"]].wait(WRITE_HANG_GUARD_SECONDS)))
        write(run_dir, state, **kwargs)

    monkeypatch.setattr(trainer_module, "write_epoch_files", held_write)
    return releases, released


@pytest.mark.parametrize("device, backend", [
    ("cpu", "torch"),
    pytest.param("cuda", "triton", marks=[pytest.mark.gpu, needs_cuda]),
    pytest.param("cuda", "torch", marks=[pytest.mark.gpu, needs_cuda]),
])
def test_checkpoints_hold_their_epochs_state_while_the_next_epoch_trains(tmp_path, monkeypatch, device, backend):
    """Each epoch's write is held until the next epoch's steps are all enqueued (on a GPU: a
    CUDA-graph step, so warm-up steps, the capture and replays, behind the snapshot's copies): the
    files must hold the weights, the average and Adam's moments as they were at their epoch's end."""
    # On a GPU, epochs of one step: 3 warm-up steps, the capture and a replay, each in its own epoch.
    epochs, ends = (trainer_module.GRAPH_WARMUP_STEPS + 2 if device == "cuda" else 3), []
    evaluate = Trainer.evaluate

    def evaluate_and_keep_the_state(self):
        ends.append({"model": {k: v.cpu().clone() for k, v in self.model.state_dict().items()},
                     "ema": {k: v.cpu().clone() for k, v in self.ema_model.state_dict().items()},
                     "exp_avg": [self.optimizer.state[p]["exp_avg"].cpu().clone() for p in self.params]})
        return evaluate(self)

    monkeypatch.setattr(Trainer, "evaluate", evaluate_and_keep_the_state)
    releases, released = held_writes(monkeypatch, epochs)
    releases[epochs].set()  # the last epoch's write has no next epoch to wait for
    trained = []

    def release_the_previous_write():
        trained.append(True)
        releases[len(trained) - 1].set()

    cuda = {"device": "cuda", "precision": "bf16", "cuda_graph": True} if device == "cuda" else {}
    trainer = make_trainer(tmp_path, model_cfg=ViTConfig(dim=32, depth=1, heads=2, mlp_dim=32, backend=backend),
                           steps=1 if cuda else 2, epochs=epochs, ema_decay=0.9,
                           wrap=lambda loader: MarkedLoader(loader, on_end=release_the_previous_write), **cuda)
    trainer.fit()
    assert released == [(epoch, True) for epoch in range(1, epochs + 1)]
    for path in ("last.pt", "best.pt"):
        state = load_checkpoint(tmp_path / path)
        end = ends[state["epoch"] - 1]
        for name, value in end["model"].items():
            assert torch.equal(state["model"][name], value), (path, name)
        for name, value in end["ema"].items():
            assert torch.equal(state["ema"][name], value), (path, name)
        for index, value in enumerate(end["exp_avg"]):
            assert torch.equal(state["optimizer"]["state"][index]["exp_avg"], value), (path, index)


# ------------------------------------------------------------------------------- the step never waits

LOCK_TYPES = (type(threading.Lock()), type(threading.RLock()))
# What blocks the calling thread until another thread acts (Python functions by file and name).
WAITING_FUNCTIONS = {("threading.py", name) for name in ("join", "wait", "wait_for", "acquire")} | {
    ("queue.py", name) for name in ("get", "put", "join")}
PROJECT = Path(trainer_module.__file__).parent


class ThreadWait(AssertionError):
    pass


@contextlib.contextmanager
def failing_on_thread_waits():
    """Raise ThreadWait at the first call, in this thread, of something that waits: threading's and
    queue's waits, a lock's acquire(), a wait or join of the project's own (the background
    writer's, a snapshot's), a CUDA synchronization."""
    def check(frame, event, arg):
        if event == "call":
            code = frame.f_code
            path = Path(code.co_filename)
            if ((path.name, code.co_name) in WAITING_FUNCTIONS
                    or (path.is_relative_to(PROJECT) and code.co_name.startswith(("wait", "join")))
                    or (path.parent.name == "cuda" and code.co_name == "synchronize")):
                raise ThreadWait(f"{code.co_name} ({path}:{frame.f_lineno}) called within a step")
        elif (event == "c_call" and getattr(arg, "__name__", None) == "acquire"
              and isinstance(getattr(arg, "__self__", None), LOCK_TYPES)):
            raise ThreadWait("a lock's acquire() called within a step")

    sys.setprofile(check)
    try:
        yield
    finally:
        sys.setprofile(None)


class StandInStream:
    """A CUDA stream's stand-in on the CPU: logs each ordering after another stream."""

    def __init__(self, log: list):
        self.log = log

    def wait_stream(self, other):
        self.log.append("stream ordered")


def graphed_on_the_cpu(trainer, monkeypatch, log: list) -> GraphedStep:
    """The trainer's step in a GraphedStep whose streams and graph are stand-ins on the CPU: the
    graph's capture runs the step, and its replay runs it again on the static buffers."""
    stream = StandInStream(log)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, stream, capture_error_mode: contextlib.nullcontext())
    graphed = GraphedStep(trainer.train_step, stream, before_capture=lambda: trainer.optimizer.zero_grad(set_to_none=True))

    class StandInGraph:
        def replay(self):
            graphed.step(graphed.images, graphed.labels)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", StandInGraph)
    return graphed


def test_the_step_and_the_graph_replay_never_wait_for_the_checkpoint_writer(tmp_path, monkeypatch):
    """After an epoch's end, with its write held on the writer thread: an eager step, then a
    CUDA-graph step's warm-up steps, capture and replays (stand-ins on the CPU) run under a profiler
    that fails on any wait, and all of them end while the write is still held. The snapshot's copies
    come first, so a warm-up step's stream is ordered after them before the step changes a weight."""
    # The schedule covers the first epoch's 2 steps and the 7 below (the captured step runs twice here).
    releases, released = held_writes(monkeypatch, epochs=5)
    trainer = make_trainer(tmp_path, steps=2, epochs=5, ema_decay=0.9)
    log = []
    graphed = graphed_on_the_cpu(trainer, monkeypatch, log)
    step = graphed.step
    graphed.step = lambda images, labels: (log.append("step"), step(images, labels))
    take = trainer.snapshot.take
    monkeypatch.setattr(trainer.snapshot, "take", lambda state: (log.append("copies enqueued"), take(state))[1])
    trainer.train_epoch(0)
    trainer.metrics.append({"epoch": 1, "train_loss": 1.0, "train_acc": 0.1, "test_loss": 1.0, "test_acc": 0.1,
                            "lr": 0.0, "epoch_seconds": 1.0, "images_per_second": 1.0})
    trainer._save_epoch(1, best=True)
    images, labels = next(iter(trainer.loader))
    try:
        with failing_on_thread_waits():
            trainer.train_step(images, labels)
            for _ in range(trainer_module.GRAPH_WARMUP_STEPS + 2):  # warm-up steps, the capture, a replay
                graphed(images, labels)
        assert released == [], "a step waited for the write"
    finally:
        releases[1].set()
        trainer.writer.wait()
    assert released == [(1, True)] and graphed.warmup_left == 0
    warm_up = ["stream ordered", "step", "stream ordered"]
    captured_and_replayed, replayed = ["step", "step"], ["step"]
    assert log == ["copies enqueued"] + warm_up * trainer_module.GRAPH_WARMUP_STEPS + captured_and_replayed + replayed


@pytest.mark.parametrize("wait", ["writer", "snapshot event", "lock"])
def test_the_wait_check_catches_a_wait_put_into_the_step(tmp_path, monkeypatch, wait):
    trainer = make_trainer(tmp_path, steps=2, epochs=1)
    lock = threading.Lock()
    waits = {"writer": trainer.writer.wait, "snapshot event": threading.Event().wait, "lock": lock.acquire}
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, images, labels: (waits[wait](), step(self, images, labels)))
    images, labels = next(iter(trainer.loader))
    with pytest.raises(ThreadWait), failing_on_thread_waits():
        trainer.train_step(images, labels)


def test_finish_evaluates_the_best_weights_in_the_runs_precision(tmp_path):
    """eval.json and metrics.csv agree: the best epoch's accuracy, computed under the same autocast."""
    trainer = make_trainer(tmp_path, steps=2, epochs=1, precision="bf16")
    trainer.fit()
    trainer.finish()
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["precision"] == "bf16"
    assert report["accuracy"] == trainer.metrics[0]["test_acc"]
