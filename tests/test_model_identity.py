"""The model a checkpoint holds is the model that runs: vit.evaluate, vit.predict and train.py
--resume refuse a checkpoint whose own model_config differs from the run's config.json in any
field, naming the field, also when every tensor keeps its shape (where loading the weights would
succeed and the wrong model would run without a word). The backend alone may differ.

The run directories are written by hand in the trainer's format (config.json beside the
checkpoint); nothing trains, and no CIFAR-10 is read: the refusal comes before the data.
"""
import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

import train
from vit import evaluate, predict
from vit.checkpoint import write_config
from vit.cli import RunError
from vit.config import TrainConfig
from vit.model import ViT, ViTConfig, model_config_differences

TINY = ViTConfig(dim=32, depth=1, heads=2, mlp_dim=32)
# One field at a time, as config.json might say while the checkpoint holds TINY. All but pool keep
# every tensor's shape; pool drops the class token (and so changes the position embedding).
CHANGED_FIELDS = [("heads", 4), ("mlp_second_gelu", True), ("layer_norm_eps", 1e-6), ("init", "pytorch"),
                  ("dropout", 0.1), ("drop_path", 0.1), ("pool", "sequence")]
SHAPE_KEEPING = {"heads", "mlp_second_gelu", "layer_norm_eps", "init", "dropout", "drop_path"}


def write_run(run_dir: Path, checkpoint_cfg: ViTConfig = TINY, config_cfg: ViTConfig | None = None,
              checkpoint_name: str = "best.pt") -> Path:
    """A run directory: config.json describing config_cfg (default: the checkpoint's own model),
    and a checkpoint holding a checkpoint_cfg model's weights and its model_config."""
    run_dir.mkdir(parents=True, exist_ok=True)
    train_cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", precision="fp32", data_dir=str(run_dir / "no-data"))
    write_config(run_dir, config_cfg or checkpoint_cfg, train_cfg, evaluate.CIFAR10_CLASS_NAMES, "cpu")
    torch.manual_seed(0)
    torch.save({"model": ViT(checkpoint_cfg).state_dict(), "epoch": 1, "model_config": asdict(checkpoint_cfg)},
               run_dir / checkpoint_name)
    return run_dir


@pytest.mark.parametrize("field, value", CHANGED_FIELDS)
def test_a_config_json_that_describes_another_model_is_refused_naming_the_field(field, value, tmp_path):
    changed = replace(TINY, **{field: value})
    if field in SHAPE_KEEPING:  # the case loading the weights alone cannot catch
        assert {k: v.shape for k, v in ViT(changed).state_dict().items()} == \
               {k: v.shape for k, v in ViT(TINY).state_dict().items()}
    run = write_run(tmp_path / "run", checkpoint_cfg=TINY, config_cfg=changed)
    with pytest.raises(RunError) as refused:
        evaluate.load_trained_model(run, torch.device("cpu"))
    message = str(refused.value)
    assert f"{field} ({getattr(TINY, field)!r} in the checkpoint, {value!r} in config.json)" in message, message
    assert "\n" not in message and "best.pt" in message


def test_the_same_model_loads_and_the_backend_may_differ(tmp_path):
    run = write_run(tmp_path / "run", checkpoint_cfg=replace(TINY, backend="triton"), config_cfg=TINY)
    trained = evaluate.load_trained_model(run, torch.device("cpu"))
    assert trained.model.cfg == TINY
    assert model_config_differences(asdict(TINY), asdict(replace(TINY, backend="triton"))) == []


def test_a_field_missing_from_an_older_file_counts_as_its_default():
    older = {k: v for k, v in asdict(TINY).items() if k not in ("pool", "drop_path")}
    assert model_config_differences(older, asdict(TINY)) == []
    assert model_config_differences(older, asdict(replace(TINY, pool="sequence"))) == [
        "pool ('token' in the checkpoint, 'sequence' in config.json)"]


def test_evaluate_and_predict_commands_exit_1_with_one_line(tmp_path, capsys):
    run = write_run(tmp_path / "run", checkpoint_cfg=TINY, config_cfg=replace(TINY, heads=4, mlp_second_gelu=True))
    image = tmp_path / "image.png"
    from PIL import Image
    Image.new("RGB", (32, 32)).save(image)
    for main, args in ((evaluate.main, [run]), (predict.main, [run, image])):
        assert main([str(a) for a in args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        assert "heads (2 in the checkpoint, 4 in config.json)" in err
        assert "mlp_second_gelu (False in the checkpoint, True in config.json)" in err


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    run = write_run(tmp_path / "run", checkpoint_cfg=TINY, config_cfg=replace(TINY, heads=4), checkpoint_name="last.pt")
    assert train.main(["--resume", str(run), "--print-config"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {run / 'last.pt'}: the checkpoint's model differs")
    assert "heads (2 in the checkpoint, 4 in config.json)" in err


def test_resume_of_the_same_model_goes_on(tmp_path, capsys):
    run = write_run(tmp_path / "run", checkpoint_name="last.pt")
    assert train.main(["--resume", str(run), "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == asdict(TINY)
