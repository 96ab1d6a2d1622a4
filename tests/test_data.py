"""The offline data layer: tensors, Avalanche streams, and the error when data is missing."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from net2grow.benchmarks import data
from net2grow.benchmarks.data import DataUnavailableError, load_digits_tensors, make_stream


def _fmnist_or_skip() -> tuple[torch.Tensor, ...]:
    try:
        return data.load_fashion_mnist()
    except DataUnavailableError as exc:
        pytest.skip(f"Fashion-MNIST not available offline: {exc}")


@pytest.fixture(scope="module")
def fmnist() -> tuple[torch.Tensor, ...]:
    return _fmnist_or_skip()


def _targets(experience) -> list[int]:
    return [int(t) for t in experience.dataset.targets]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _fake_fmnist(folder: Path, n_train: int = 30, n_test: int = 10) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    arrays = (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        np.arange(n_train, dtype=np.uint8) % 10,
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        np.arange(n_test, dtype=np.uint8) % 10,
    )
    for stem, a in zip(data._FMNIST_FILES.values(), arrays, strict=True):
        _write_idx(folder / f"{stem}.gz", a)
    return arrays


# --- tensors ---------------------------------------------------------------------------------
def test_digits_tensors_shapes_and_range() -> None:
    x_tr, y_tr, x_te, y_te = load_digits_tensors()
    assert x_tr.dtype == x_te.dtype == torch.float32
    assert y_tr.dtype == y_te.dtype == torch.int64
    assert x_tr.shape[1:] == x_te.shape[1:] == (64,)
    assert len(x_tr) + len(x_te) == 1797 and len(x_tr) == len(y_tr) and len(x_te) == len(y_te)
    assert float(x_tr.min()) >= 0.0 and float(x_tr.max()) == 1.0
    assert sorted(y_tr.unique().tolist()) == sorted(y_te.unique().tolist()) == list(range(10))


def test_fashion_mnist_tensors(fmnist) -> None:
    x_tr, y_tr, x_te, y_te = fmnist
    assert x_tr.shape == (60000, 1, 28, 28) and x_te.shape == (10000, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    assert torch.bincount(y_tr).tolist() == [6000] * 10
    assert torch.bincount(y_te).tolist() == [1000] * 10


def test_data_root_is_read_first(tmp_path: Path) -> None:
    arrays = _fake_fmnist(tmp_path)
    x_tr, y_tr, x_te, y_te = data.load_fashion_mnist(tmp_path)
    assert x_tr.shape == (30, 1, 28, 28) and x_te.shape == (10, 1, 28, 28)
    assert torch.equal(x_tr[:, 0], torch.from_numpy(arrays[0]).float() / 255)
    assert y_tr.tolist() == arrays[1].tolist() and y_te.tolist() == arrays[3].tolist()


def test_truncated_idx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    _write_idx(path, np.zeros((4, 28, 28), dtype=np.uint8))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match="truncated"):
        data._read_idx(path)


def test_missing_data_names_the_three_options(tmp_path: Path, monkeypatch) -> None:
    def no_network(root: Path):
        raise OSError("no network")

    monkeypatch.setattr(data, "DEBIAN_FMNIST_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(data, "_torchvision_fashion_mnist", no_network)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataUnavailableError) as info:
        data.load_fashion_mnist(empty)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "--data-root" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "torchvision" in message and "download" in message
    assert str(empty) in message  # says where it looked
    for stream in ("split-fmnist", "permuted-fmnist"):
        with pytest.raises(DataUnavailableError):
            make_stream(stream, data_root=empty)


# --- streams ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["split-digits", "split-fmnist"])
def test_class_incremental_split(name: str) -> None:
    if name == "split-fmnist":
        _fmnist_or_skip()
    bench, info = make_stream(name, seed=3)
    assert info.n_experiences == 5 == len(bench.train_stream) == len(bench.test_stream)
    assert info.n_classes == 10 and info.scenario == "class" and info.incremental == "class"
    assert info.input_shape == ((64,) if name == "split-digits" else (1, 28, 28))
    seen: set[int] = set()
    for k, (tr, te) in enumerate(zip(bench.train_stream, bench.test_stream, strict=True)):
        classes = set(_targets(tr))
        assert len(classes) == 2 and classes == set(info.classes_per_experience[k])
        assert set(_targets(te)) == classes
        assert not classes & seen
        seen |= classes
        assert set(tr.task_labels) == {0}
        x, _, t = tr.dataset[0]
        assert tuple(x.shape) == info.input_shape and int(t) == 0
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert seen == set(range(10))
    assert info.n_train == sum(len(e.dataset) for e in bench.train_stream)


def test_batches_are_x_y_t() -> None:
    bench, _ = make_stream("split-digits", scenario="task")
    loader = torch.utils.data.DataLoader(bench.train_stream[2].dataset, batch_size=8)
    x, y, t = next(iter(loader))
    assert x.shape == (8, 64) and y.shape == t.shape == (8,)
    assert t.tolist() == [2] * 8


def test_task_incremental_split() -> None:
    bench, info = make_stream("split-digits", scenario="task", n_experiences=2, seed=1)
    assert info.n_classes == 5 and info.n_experiences == 2 and info.incremental == "task"
    for stream in (bench.train_stream, bench.test_stream):
        for exp in stream:
            assert set(exp.task_labels) == {exp.current_experience}
            assert set(_targets(exp)) == set(range(5))  # class ids from zero in each experience
    assert sorted(sum(info.classes_per_experience, ())) == list(range(10))
    x_tr, y_tr, _, _ = load_digits_tensors()
    for exp in bench.train_stream:
        for i in (0, 150, len(exp.dataset) - 1):
            x, y, t = exp.dataset[i]
            original = y_tr[(x_tr == x).all(dim=1)].unique().tolist()
            assert original == [info.classes_per_experience[int(t)][int(y)]]


def test_seed_sets_the_class_order() -> None:
    _, a = make_stream("split-digits", seed=0)
    _, b = make_stream("split-digits", seed=0)
    _, c = make_stream("split-digits", seed=1)
    assert a.classes_per_experience == b.classes_per_experience != c.classes_per_experience


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="divide"):
        make_stream("split-digits", n_experiences=3)
    with pytest.raises(ValueError, match="unknown stream"):
        make_stream("split-cifar")
    with pytest.raises(ValueError, match="scenario"):
        make_stream("split-digits", scenario="domain")
    with pytest.raises(ValueError, match="scenario"):
        make_stream("split-digits", scenario="online")


def test_subsampled_split_digits() -> None:
    bench, info = make_stream("split-digits", train_per_exp=100, test_per_exp=20)
    assert info.n_train == 500 and info.n_test == 100
    assert [len(e.dataset) for e in bench.train_stream] == [100] * 5
    assert [len(e.dataset) for e in bench.test_stream] == [20] * 5


def test_permuted_fmnist_full_label_distribution(fmnist) -> None:
    _, y_tr, _, y_te = fmnist
    bench, info = make_stream("permuted-fmnist", n_experiences=1)
    assert info.incremental == "domain" and info.n_classes == 10
    for exp in bench.train_stream:
        assert torch.bincount(torch.tensor(_targets(exp))).tolist() == torch.bincount(y_tr).tolist()
        assert set(exp.task_labels) == {0}
    for exp in bench.test_stream:
        assert torch.bincount(torch.tensor(_targets(exp))).tolist() == torch.bincount(y_te).tolist()


@pytest.mark.parametrize("scenario", ["domain", "task"])
def test_permuted_fmnist_permutes_pixels(fmnist, scenario: str) -> None:
    x_tr, y_tr, _, _ = fmnist
    bench, info = make_stream(
        "permuted-fmnist", scenario=scenario, n_experiences=3, train_per_exp=200,
        test_per_exp=50, seed=5,
    )
    assert info.n_experiences == 3 and len(info.permutations) == 3
    assert info.incremental == ("task" if scenario == "task" else "domain")
    perms = [p.tolist() for p in info.permutations]
    assert len({tuple(p) for p in perms}) == 3
    assert all(sorted(p) == list(range(784)) for p in perms)
    flat = x_tr.reshape(len(x_tr), -1)
    for k, exp in enumerate(bench.train_stream):
        assert len(exp.dataset) == 200
        assert torch.bincount(torch.tensor(_targets(exp))).tolist() == [20] * 10
        assert set(exp.task_labels) == {k if scenario == "task" else 0}
        for i in (0, 57, 199):
            x, y, _ = exp.dataset[i]
            assert x.shape == (1, 28, 28)
            restored = torch.empty(784)
            restored[info.permutations[k]] = x.reshape(-1)
            assert not torch.equal(x.reshape(-1), restored)
            # the permuted image is an original image of the same label, its pixels moved
            same_label = flat[y_tr == int(y)]
            assert bool((same_label == restored).all(dim=1).any())
    assert [len(e.dataset) for e in bench.test_stream] == [50] * 3
