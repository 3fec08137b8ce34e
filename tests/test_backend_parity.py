"""The triton backend computes the same function as the torch reference, end to end."""
import os
import subprocess
import sys

import pytest
import torch

from vit import ViT, ViTConfig
from vit.backends import get_backend

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [pytest.mark.skipif(not torch.cuda.is_available() and not INTERPRETED,
                                 reason="the Triton kernels need CUDA or TRITON_INTERPRET=1")]
# Marks the tests that run the kernels in this process: through the interpreter when it is on.
interpreted_here = pytest.mark.interpreter if INTERPRETED else (lambda test: test)


def gradients(model, images, labels):
    model.zero_grad()
    logits = model(images)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@interpreted_here
@pytest.mark.parametrize("cfg", [
    ViTConfig(image_size=16, patch_size=4, dim=48, depth=2, heads=3, mlp_dim=80),  # N = 17, head dim 16
    ViTConfig(image_size=8, patch_size=2, dim=64, depth=1, heads=2, mlp_dim=64),  # N = 17, head dim 32
])
def test_tiny_vit_same_logits_and_gradients_under_both_backends(cfg):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = ViT(cfg).to(device).double().float()
    images = torch.randn(3, 3, cfg.image_size, cfg.image_size, device=device)
    labels = torch.randint(0, cfg.num_classes, (3,), device=device)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    ref_logits, ref_grads = gradients(model, images, labels)
    model.set_backend("triton")
    logits, grads = gradients(model, images, labels)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-5)
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@interpreted_here
def test_triton_backend_announces_itself():
    backend = get_backend("triton")
    assert backend.name == "triton" and "kernels.attention" in backend.description
    assert backend.unavailable_reason(torch.device("cuda" if torch.cuda.is_available() else "cpu")) is None


@pytest.mark.interpreter
def test_train_py_runs_the_triton_backend_through_the_interpreter(fake_cifar, tmp_path):
    # A small generated data set: the interpreter would take minutes over the real 10,000
    # test images, which the trainer evaluates after the epoch and again at the end. Its cost
    # is one interpreted program per row tile: one step of 8 images of 17 tokens (8-pixel patches).
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", "--backend", "triton", "--device", "cpu", "--epochs", "1",
         "--batch-size", "8", "--train-subset", "8", "--patch-size", "8", "--depth", "1", "--dim", "64",
         "--heads", "2", "--mlp-dim", "64",
         "--no-progress", "--data-dir", str(fake_cifar), "--out-dir", str(run)],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True, env=env,
        timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "backend triton (fused Triton kernels" in result.stdout
    assert (run / "last.pt").exists()


def test_triton_without_gpu_or_interpreter_is_a_clear_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    result = subprocess.run([sys.executable, "train.py", "--backend", "triton", "--device", "cpu"],
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "--backend triton cannot run on cpu" in result.stderr
    assert "TRITON_INTERPRET=1" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.gpu
def test_short_real_training_run_tracks_the_torch_backend_on_gpu(real_data_dir, tmp_path):
    """The default model, bf16, 2 epochs on 10,000 real images: same seed, same data order,
    same initial weights, so the per-epoch losses of both backends differ only by the
    rounding of bf16 kernels, which compounds but stays small over 156 steps."""
    from vit.trainer import TrainConfig, build_trainer

    runs = {}
    for backend in ("torch", "triton"):
        cfg = TrainConfig(epochs=2, warmup_epochs=1, device="cuda", precision="bf16", train_subset=10_000,
                          data_dir=str(real_data_dir), progress=False)
        trainer = build_trainer(ViTConfig(backend=backend), cfg, tmp_path / backend, log=lambda line: None)
        runs[backend] = [trainer.train_epoch(epoch)["train_loss"] for epoch in range(cfg.epochs)]
    for torch_loss, triton_loss in zip(runs["torch"], runs["triton"]):
        assert abs(triton_loss - torch_loss) < 0.03 * torch_loss, runs
    assert runs["triton"][1] < runs["triton"][0], runs


def test_triton_backend_is_unavailable_where_the_interpreter_is_broken(monkeypatch):
    """On the CPU the backend needs the interpreter; a stack whose interpreter cannot run (Triton
    3.6 with NumPy 2.4+) makes it unavailable with the reason, rather than failing mid-run."""
    import kernels._common
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels._common, "interpreter_broken_reason", lambda: "broken for this test")
    assert get_backend("triton").unavailable_reason(torch.device("cpu")) == "broken for this test"
