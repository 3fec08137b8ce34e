"""CIFAR-10 files are read with a restricted unpickler: the layout's dicts, lists, strings,
bytes, ints and uint8 arrays load, from pickles written by numpy 1.x (numpy.core) and 2.x
(numpy._core) at every protocol; anything else is "not a CIFAR-10 file" and nothing in the
file runs."""
import os
import pickle

import numpy as np
import pytest

from vit import data as cifar

EXPECTED = np.arange(6, dtype=np.uint8).reshape(2, 3) * 40
# Pickles of {b"data": EXPECTED, b"labels": [3, 8]} written by numpy 1.26.4 under Python 3.11
# (pickle.dumps(batch, protocol=P).hex()): numpy 1 names numpy.core, which numpy 2 renamed.
NUMPY1_PICKLES = {
    2: '80027d710028635f636f646563730a656e636f64650a7101580400000064617461710258060000006c6174696e31710386710452'
       '7105636e756d70792e636f72652e6d756c746961727261790a5f7265636f6e7374727563740a7106636e756d70790a6e64617272'
       '61790a71074b0085710868015801000000627109680386710a52710b87710c52710d284b014b024b0386710e636e756d70790a64'
       '747970650a710f5802000000753171108988877111527112284b0358010000007c71134e4e4e4affffffff4affffffff4b007471'
       '1462896801580800000000285078c2a0c3887115680386711652711774711862680158060000006c6162656c737119680386711a'
       '52711b5d711c284b034b0865752e',
    4: '800495ac000000000000007d9428430464617461948c156e756d70792e636f72652e6d756c74696172726179948c0c5f7265636f'
       '6e7374727563749493948c056e756d7079948c076e6461727261799493944b0085944301629487945294284b014b024b03869468'
       '058c0564747970659493948c02753194898887945294284b038c017c944e4e4e4affffffff4affffffff4b007494628943060028'
       '5078a0c89474946243066c6162656c73945d94284b034b0865752e',
    5: '80059597000000000000007d9428430464617461948c126e756d70792e636f72652e6e756d65726963948c0b5f66726f6d627566'
       '6665729493942896060000000000000000285078a0c8948c056e756d7079948c0564747970659493948c02753194898887945294'
       '284b038c017c944e4e4e4affffffff4affffffff4b007494624b024b0386948c0143947494529443066c6162656c73945d94284b'
       '034b0865752e',
}
# The same batch (with a b"batch_label", as the official files have) as Python 2.7's cPickle writes
# numpy 1.x's reduce values at protocol 2: strings are py2 str, read back as bytes.
PYTHON2_PICKLE = (
    "80027d710128550b62617463685f6c6162656c71025515747261696e696e672062617463682031206f662035710355066c616265"
    "6c7371045d7105284b034b08655504646174617106636e756d70792e636f72652e6d756c746961727261790a5f7265636f6e7374"
    "727563740a7107636e756d70790a6e6461727261790a71084b008571095501628752710a284b014b024b0386710b636e756d7079"
    "0a64747970650a710c55027531710d4b004b0187710e52710f284b0355017c4e4e4e4affffffff4affffffff4b00747110628955"
    "0600285078a0c871117462752e"
)


def load(tmp_path, payload: bytes):
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    return cifar._unpickle(path)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy1_pickles_load(tmp_path, protocol):
    batch = load(tmp_path, bytes.fromhex(NUMPY1_PICKLES[protocol]))
    assert batch[b"labels"] == [3, 8]
    assert batch[b"data"].dtype == np.uint8 and np.array_equal(batch[b"data"], EXPECTED)


def test_python2_pickle_loads_with_bytes_keys(tmp_path):
    batch = load(tmp_path, bytes.fromhex(PYTHON2_PICKLE))
    assert batch[b"batch_label"] == b"training batch 1 of 5"
    assert batch[b"labels"] == [3, 8] and np.array_equal(batch[b"data"], EXPECTED)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("order", ["C", "F"])
def test_pickles_of_the_installed_numpy_load(tmp_path, protocol, order):
    array = np.asarray(EXPECTED, order=order)
    batch = load(tmp_path, pickle.dumps({b"data": array, b"labels": [3, 8], b"names": [b"a", "b"]}, protocol=protocol))
    assert np.array_equal(batch[b"data"], EXPECTED) and batch[b"names"] == [b"a", "b"]


def test_real_files_load_as_plain_pickle_would(real_data_dir):
    path = real_data_dir / cifar.FOLDER / cifar.TEST_FILE
    with open(path, "rb") as f:
        plain = pickle.load(f, encoding="bytes")
    restricted = cifar._unpickle(path)
    assert restricted.keys() == plain.keys()
    assert np.array_equal(restricted[b"data"], plain[b"data"]) and restricted[b"data"].dtype == np.uint8
    assert restricted[b"labels"] == plain[b"labels"] and restricted[b"filenames"] == plain[b"filenames"]


class RunsACommand:
    """What the issue found planted in data_batch_3: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CreatesAFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("payload", [
    lambda marker: {b"data": RunsACommand(marker), b"labels": [1]},
    lambda marker: {b"data": np.array([CreatesAFile(marker)], dtype=object), b"labels": [1]},  # inside an array
    lambda marker: [CreatesAFile(marker)],
], ids=["os.system", "object-array", "builtins.open"])
def test_hostile_pickle_is_refused_and_its_payload_never_runs(fake_cifar, tmp_path, payload):
    marker = tmp_path / "payload-ran"
    hostile = pickle.dumps(payload(marker))
    control = tmp_path / "control"
    control.write_bytes(hostile)
    with open(control, "rb") as f:
        pickle.load(f)  # the plain unpickler runs it: the payload is live
    assert marker.exists()
    marker.unlink()

    (fake_cifar / "data_batch_3").write_bytes(hostile)
    with pytest.raises(cifar.DataError) as error:
        cifar.load_cifar10(fake_cifar, download=False)
    assert not marker.exists()
    message = str(error.value)
    assert "\n" not in message and "data_batch_3: not a CIFAR-10 file" in message and "nothing in it was run" in message


@pytest.mark.parametrize("array", [
    np.arange(6, dtype=np.int64),
    np.arange(6, dtype=np.float32),
    np.zeros(2, dtype=[("a", np.uint8), ("b", np.uint8)]),
], ids=["int64", "float32", "structured"])
def test_arrays_other_than_uint8_are_not_cifar(tmp_path, array):
    with pytest.raises(cifar.DataError, match="not a CIFAR-10 file"):
        load(tmp_path, pickle.dumps({b"data": array}))


class ShortArray:
    """Pickles as numpy's own reduce of a (2, 3) uint8 array would, with 5 bytes instead of 6."""

    def __reduce__(self):
        reconstruct = np.zeros(1, np.uint8).__reduce__()[0]  # numpy.core's or numpy._core's, as installed
        return reconstruct, (np.ndarray, (0,), b"b"), (1, (2, 3), np.dtype("u1"), False, bytes(5))


def test_array_bytes_that_do_not_match_the_shape_are_not_cifar(tmp_path):
    with pytest.raises(cifar.DataError, match="bytes do not match its shape"):
        load(tmp_path, pickle.dumps({b"data": ShortArray()}))


def test_labels_that_are_not_integers_are_a_data_error(fake_cifar):
    with open(fake_cifar / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [b"cat", b"dog"]}, f)
    with pytest.raises(cifar.DataError, match="test_batch: b'labels' are not integers"):
        cifar.load_cifar10(fake_cifar, download=False)
