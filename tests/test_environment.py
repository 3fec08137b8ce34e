"""Where a run happens: --device parsing, recorded versions, atomic writes."""
import pytest
import torch

from vit.environment import WriteError, atomic_write, device_name, parse_device, versions


def test_parse_device_defaults_to_what_the_machine_has():
    assert parse_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert parse_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, message", [
    ("gpu", "use cuda, cuda:N or cpu"),
    ("meta", "use cuda, cuda:N or cpu"),
])
def test_parse_device_rejects_what_is_not_a_training_device(name, message):
    with pytest.raises(ValueError, match=message):
        parse_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")
def test_parse_device_without_cuda_says_so():
    with pytest.raises(ValueError, match="CUDA is not available on this machine; use --device cpu"):
        parse_device("cuda:0")


def test_versions_and_device_name_record_the_machine():
    v = versions()
    assert v["torch"] == torch.__version__ and v["torchvision"] and v["triton"]
    assert {"python", "cuda", "cudnn", "timm"} <= set(v)
    assert device_name(torch.device("cpu")).startswith("cpu (")


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "state.txt"
    atomic_write(path, lambda tmp: tmp.write_text("first"))
    assert path.read_text() == "first"

    def crash_midway(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(WriteError, match=f"cannot write {path}: disk full; its previous version is intact"):
        atomic_write(path, crash_midway)
    assert path.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.txt"]  # the temporary is gone too
