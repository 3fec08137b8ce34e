"""vit.predict decodes an image as the pixels it holds: every PIL mode to 8-bit RGB by its range,
each against a reference conversion written here in numpy from the source values; a multi-frame
file names the frame used; a batch of files with unreadable ones predicts the rest."""
import json

import numpy as np
import pytest
from PIL import Image

from test_model_identity import write_run
from vit import predict
from vit.predict import load_image, to_rgb8

SIZE = 8  # the images' side, and the model input size handed to load_image: no resize, no crop


def rng():
    return np.random.default_rng(0)


def grey3(values) -> np.ndarray:
    return np.repeat(np.asarray(values, dtype=np.uint8)[..., None], 3, axis=2)


def over_white(rgb, alpha) -> np.ndarray:
    """The reference composite: colour times alpha plus white times the rest, rounded."""
    a = np.asarray(alpha, dtype=np.float64)[..., None] / 255
    return np.round(np.asarray(rgb, dtype=np.float64) * a + 255 * (1 - a)).astype(np.uint8)


def sixteen_bit():
    values = rng().integers(0, 65536, (SIZE, SIZE)).astype(np.uint16)
    values[0, :3] = (0, 257, 65535)  # black, the smallest step, white
    return values, grey3(np.round(values / 257))


def case_i16(mode):
    values, expected = sixteen_bit()
    dtype = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, (SIZE, SIZE), values.astype(dtype).tobytes()), expected


def case_stretched(mode):
    if mode == "I":
        values = rng().integers(-70000, 200000, (SIZE, SIZE)).astype(np.int32)
    else:
        values = rng().normal(0.3, 0.05, (SIZE, SIZE)).astype(np.float32)  # a dim float image
    v = values.astype(np.float64)
    expected = grey3(np.round((v - v.min()) / (v.max() - v.min()) * 255))
    return Image.fromarray(values), expected


def case_cmyk():
    cmyk = rng().integers(0, 256, (SIZE, SIZE, 4)).astype(np.uint8)
    c = cmyk.astype(np.float64)
    expected = np.round((255 - c[..., :3]) * (255 - c[..., 3:]) / 255).astype(np.uint8)
    return Image.frombytes("CMYK", (SIZE, SIZE), cmyk.tobytes()), expected


def palette():
    return rng().integers(0, 256, (256, 3)).astype(np.uint8)


def case_palette(transparent: bool):
    colours = palette()
    indices = rng().integers(0, 4, (SIZE, SIZE)).astype(np.uint8)
    image = Image.frombytes("P", (SIZE, SIZE), indices.tobytes())
    image.putpalette(colours.tobytes())
    expected = colours[indices]
    if transparent:
        image.info["transparency"] = 2
        expected = over_white(expected, np.where(indices == 2, 0, 255))
    return image, expected


def case_pa():
    colours = palette()
    indices = rng().integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
    alpha = rng().integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
    image = Image.frombytes("PA", (SIZE, SIZE), np.stack([indices, alpha], axis=2).tobytes())
    image.putpalette(colours.tobytes())
    return image, over_white(colours[indices], alpha)


def case_la():
    la = rng().integers(0, 256, (SIZE, SIZE, 2)).astype(np.uint8)
    return Image.frombytes("LA", (SIZE, SIZE), la.tobytes()), over_white(grey3(la[..., 0]), la[..., 1])


def case_rgba():
    rgba = rng().integers(0, 256, (SIZE, SIZE, 4)).astype(np.uint8)
    return Image.frombytes("RGBA", (SIZE, SIZE), rgba.tobytes()), over_white(rgba[..., :3], rgba[..., 3])


def case_l():
    grey = rng().integers(0, 256, (SIZE, SIZE)).astype(np.uint8)
    return Image.frombytes("L", (SIZE, SIZE), grey.tobytes()), grey3(grey)


def case_bilevel():
    bits = rng().integers(0, 2, (SIZE, SIZE)).astype(bool)
    return Image.frombytes("1", (SIZE, SIZE), np.packbits(bits, axis=1).tobytes()), grey3(bits * 255)


def case_rgb():
    rgb = rng().integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)
    return Image.frombytes("RGB", (SIZE, SIZE), rgb.tobytes()), rgb


# mode -> (image, reference RGB), and the file format that stores the mode (None: held in memory only).
CASES = {
    "I;16": (lambda: case_i16("I;16"), "png"),
    "I;16L": (lambda: case_i16("I;16L"), None),
    "I;16B": (lambda: case_i16("I;16B"), None),
    "I": (lambda: case_stretched("I"), "tiff"),
    "F": (lambda: case_stretched("F"), "tiff"),
    "CMYK": (case_cmyk, "tiff"),
    "P": (lambda: case_palette(transparent=False), "png"),
    "P with transparency": (lambda: case_palette(transparent=True), "png"),
    "PA": (case_pa, None),
    "LA": (case_la, "png"),
    "RGBA": (case_rgba, "png"),
    "L": (case_l, "png"),
    "1": (case_bilevel, "png"),
    "RGB": (case_rgb, "png"),
}


@pytest.mark.parametrize("mode", list(CASES))
def test_each_mode_is_decoded_by_its_range(mode, tmp_path):
    make, file_format = CASES[mode]
    image, expected = make()
    assert image.mode == mode.split()[0]
    np.testing.assert_array_equal(to_rgb8(image), expected)
    if file_format:  # and through a file, as the command reads it
        path = tmp_path / f"image.{file_format}"
        image.save(path)
        with Image.open(path) as reopened:
            assert reopened.mode == image.mode, "the format did not keep the mode"
        loaded = load_image(str(path), SIZE)
        assert loaded.error is None and loaded.note is None
        np.testing.assert_array_equal(loaded.pixels.permute(1, 2, 0).numpy(), expected)


def test_a_float_image_stretches_over_its_finite_values():
    values = np.array([[0.5, np.nan, 1.5, np.inf, -np.inf, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_rgb8(Image.fromarray(values))[..., 0], [[0, 0, 255, 255, 0, 128]])


def test_a_multi_frame_file_names_the_frame_used(tmp_path):
    frames = [Image.new("RGB", (SIZE, SIZE), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    path = tmp_path / "animation.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    loaded = load_image(str(path), SIZE)
    assert loaded.note == "frame 1 of 3 used"
    assert (loaded.pixels[0] == 255).all() and (loaded.pixels[1:] == 0).all()


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """A run, two readable images and two unreadable files."""
    root = tmp_path_factory.mktemp("batch")
    run = write_run(root / "run")
    good = [root / "a.png", root / "b.png"]
    for path, value in zip(good, (30, 220)):
        Image.new("RGB", (32, 32), (value, value, value)).save(path)
    not_an_image = root / "notes.png"
    not_an_image.write_text("not a picture")
    return run, good, [not_an_image, root / "missing.png"]


def test_unreadable_files_are_reported_in_their_rows_and_the_rest_predicted(batch, capsys):
    run, good, bad = batch
    assert predict.main([str(run), str(good[0]), str(bad[0]), str(good[1]), str(bad[1])]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == str(good[0]) and lines[1].startswith("  1. ")
    row = lines.index(str(bad[0]))
    assert lines[row + 1].startswith("  error: cannot read the image")
    assert lines[row + 2] == str(good[1]) and lines[row + 3].startswith("  1. ")
    assert lines[-2] == str(bad[1]) and lines[-1].startswith("  error: cannot read the image")
    assert captured.err == "warning: 2 of 4 images could not be read (see their rows)\n"


def test_json_carries_the_per_file_errors(batch, capsys):
    run, good, bad = batch
    assert predict.main([str(run), str(good[0]), str(bad[0]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unreadable"] == 1
    first, second = report["predictions"]
    assert first["image"] == str(good[0]) and len(first["top"]) == 3 and "error" not in first
    assert second == {"image": str(bad[0]), "error": second["error"]} and "cannot read the image" in second["error"]


def test_strict_fails_on_any_unreadable_file_and_nothing_readable_fails(batch, capsys):
    run, good, bad = batch
    assert predict.main([str(run), str(good[0]), str(bad[0]), "--strict"]) == 1
    captured = capsys.readouterr()
    assert str(good[0]) in captured.out and captured.err == "error: 1 of 2 images could not be read (see their rows)\n"
    assert predict.main([str(run), *map(str, bad)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {bad[0]}: cannot read the image") and "no image" in err


def test_a_backend_that_cannot_run_on_the_device_is_a_usage_error(batch, capsys, monkeypatch):
    run, good, _ = batch
    if "triton" not in predict.backend_names():
        pytest.skip("Triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # without the interpreter the kernels need a GPU
    with pytest.raises(SystemExit) as exited:
        predict.main([str(run), str(good[0]), "--backend", "triton", "--device", "cpu"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--backend triton cannot run on cpu" in err and "--help" in err
