"""Offline data layer: digits and Fashion-MNIST tensors, and Avalanche streams built on them.

Every stream works without a network: ``split-digits`` uses scikit-learn's bundled digits;
``split-fmnist`` and ``permuted-fmnist`` read Fashion-MNIST's IDX files from ``data_root``, from
Debian's ``dataset-fashion-mnist`` package, or (only where a network exists) torchvision's download.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "DEBIAN_FMNIST_DIR",
    "STREAMS",
    "DataUnavailableError",
    "StreamInfo",
    "load_digits_tensors",
    "load_fashion_mnist",
    "make_stream",
]

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
DEBIAN_FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

#: Default download folder of the torchvision fallback when no ``data_root`` is given.
DEFAULT_DOWNLOAD_ROOT = Path("data")

_FMNIST_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

#: Stream names and their default number of experiences.
STREAMS = {"split-digits": 5, "split-fmnist": 5, "permuted-fmnist": 10}
SCENARIOS = ("class", "task")

Tensors4 = tuple[Tensor, Tensor, Tensor, Tensor]


class DataUnavailableError(RuntimeError):
    """No source of a data set could be read; the message lists the ways to provide one."""


# --- digits ----------------------------------------------------------------------------------
def load_digits_tensors(test_fraction: float = 0.25, split_seed: int = 0) -> Tensors4:
    """scikit-learn's bundled 8x8 digits as float tensors in [0, 1], 64 features per image.

    Parameters
    ----------
    test_fraction : float
        Share of the 1,797 images held out as the test set (stratified by class).
    split_seed : int
        Seed of the train/test split; fixed by default so every run tests on the same images.

    Returns
    -------
    tuple of Tensor
        ``(x_train, y_train, x_test, y_test)``: ``x`` float32 shaped ``(N, 64)``, ``y`` int64.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.asarray(digits.data, dtype=np.float32) / 16.0
    y = np.asarray(digits.target, dtype=np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=split_seed
    )
    return (
        torch.from_numpy(np.ascontiguousarray(x_tr)),
        torch.from_numpy(np.ascontiguousarray(y_tr)),
        torch.from_numpy(np.ascontiguousarray(x_te)),
        torch.from_numpy(np.ascontiguousarray(y_te)),
    )


# --- Fashion-MNIST ---------------------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file (gzip-compressed or not) into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: only unsigned-byte IDX data is supported, got type {data[2]:#x}")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(
            f"{path}: expected {expected} bytes of data for shape {shape}, "
            f"found {len(data) - header} (truncated or corrupt file)"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    """``folder/stem.gz`` or ``folder/stem``, also under torchvision's ``FashionMNIST/raw``."""
    for base in (folder, folder / "FashionMNIST" / "raw"):
        for name in (f"{stem}.gz", stem):
            if (base / name).is_file():
                return base / name
    return None


def _to_tensors(x_tr: Any, y_tr: Any, x_te: Any, y_te: Any) -> Tensors4:
    def images(a: Any) -> Tensor:
        t = torch.from_numpy(np.array(a, dtype=np.uint8))  # a writable copy
        return (t.to(torch.float32) / 255.0).reshape(-1, 1, 28, 28)

    def labels(a: Any) -> Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.int64))

    return images(x_tr), labels(y_tr), images(x_te), labels(y_te)


@functools.lru_cache(maxsize=2)
def _parse_idx_files(files: tuple[tuple[str, int, int], ...]) -> tuple[np.ndarray, ...]:
    """Parsed IDX arrays of ``files`` (path, mtime, size): kept in memory, never on disk."""
    return tuple(_read_idx(Path(path)) for path, _, _ in files)


def _read_fmnist_dir(folder: Path) -> Tensors4:
    """The four Fashion-MNIST IDX files in ``folder``; ``FileNotFoundError`` if one is absent."""
    files = []
    for stem in _FMNIST_FILES.values():
        found = _find_idx(folder, stem)
        if found is None:
            raise FileNotFoundError(f"{folder / stem}.gz not found")
        stat = found.stat()
        files.append((str(found.resolve()), stat.st_mtime_ns, stat.st_size))
    x_tr, y_tr, x_te, y_te = _parse_idx_files(tuple(files))
    for split, x, y in (("train", x_tr, y_tr), ("test", x_te, y_te)):
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"Fashion-MNIST {split} files in {folder} have unexpected shapes "
                f"{x.shape} and {y.shape}"
            )
    return _to_tensors(x_tr, y_tr, x_te, y_te)


def _torchvision_fashion_mnist(root: Path) -> Tensors4:
    """torchvision's FashionMNIST, downloaded into ``root`` (needs a network the first time)."""
    from torchvision.datasets import FashionMNIST

    train = FashionMNIST(str(root), train=True, download=True)
    test = FashionMNIST(str(root), train=False, download=True)
    return _to_tensors(train.data.numpy(), train.targets.numpy(),
                       test.data.numpy(), test.targets.numpy())


def load_fashion_mnist(data_root: str | Path | None = None) -> Tensors4:
    """Fashion-MNIST as tensors, read offline wherever possible.

    Sources, in order: the IDX files (``.gz`` or not, also under ``FashionMNIST/raw``) in
    ``data_root``; Debian's ``/usr/share/datasets/fashion-mnist``; torchvision's download into
    ``data_root`` (or ``./data``), which needs a network. Parsed files are kept in memory
    (keyed by path, size and mtime; nothing is cached on disk); every call returns fresh tensors.

    Returns
    -------
    tuple of Tensor
        ``(x_train, y_train, x_test, y_test)``: images float32 in [0, 1] shaped
        ``(N, 1, 28, 28)``, labels int64 in [0, 10).

    Raises
    ------
    DataUnavailableError
        When no source works; the message says how to provide the data.
    """
    tried: list[str] = []
    folders = ([Path(data_root)] if data_root is not None else []) + [DEBIAN_FMNIST_DIR]
    for folder in folders:
        try:
            return _read_fmnist_dir(folder)
        except (FileNotFoundError, ValueError, OSError, EOFError) as exc:
            tried.append(f"{folder}: {exc}")
    download_root = Path(data_root) if data_root is not None else DEFAULT_DOWNLOAD_ROOT
    try:
        return _torchvision_fashion_mnist(download_root)
    except Exception as exc:  # any failure of the download path: report every source tried
        tried.append(f"torchvision download into {download_root}: {type(exc).__name__}: {exc}")
    raise DataUnavailableError(
        "Fashion-MNIST is not available. Provide it in one of three ways:\n"
        "  1. --data-root DIR: a folder holding train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz;\n"
        f"  2. `apt-get install dataset-fashion-mnist` (installs them in {DEBIAN_FMNIST_DIR});\n"
        "  3. torchvision download (FashionMNIST(download=True)), which needs a network.\n"
        "Tried:\n  - " + "\n  - ".join(tried)
    )


# --- datasets Avalanche can split ------------------------------------------------------------
class TensorClassificationSet(Dataset):
    """``(x, y)`` pairs from two tensors, with the ``targets`` Avalanche reads to split classes.

    If ``permutation`` is given, each image's pixels are permuted on the fly (flattened order),
    so a permuted stream stores the images only once.
    """

    def __init__(self, x: Tensor, y: Tensor, permutation: Tensor | None = None) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x = x
        self.y = y
        self.targets = y.tolist()
        self.permutation = permutation

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.x[index]
        if self.permutation is not None:
            x = x.reshape(-1)[self.permutation].reshape(x.shape)
        return x, self.targets[index]


def _stratified_subset(y: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Indices of ``n`` samples of ``y`` drawn per class in proportion to class frequency."""
    if n >= len(y):
        return torch.arange(len(y))
    if n <= 0:
        raise ValueError(f"a subset needs at least one sample, got {n}")
    classes, counts = torch.unique(y, return_counts=True)
    quota = torch.floor(counts.double() * n / len(y)).long()
    remainder = n - int(quota.sum())
    if remainder:  # give the leftover samples to the most frequent classes
        order = torch.argsort(counts, descending=True, stable=True)
        quota[order[:remainder]] += 1
    quota = torch.minimum(quota, counts)
    chosen = []
    for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
        idx = torch.nonzero(y == c).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=generator)[:q]])
    return torch.sort(torch.cat(chosen)).values


def _permuted_set(
    x: Tensor, y: Tensor, perm: Tensor, n: int | None, gen: torch.Generator
) -> TensorClassificationSet:
    """One permuted experience; shares ``x`` unless a subset of ``n`` samples is asked for."""
    if n:
        keep = _stratified_subset(y, n, gen)
        x, y = x[keep], y[keep]
    return TensorClassificationSet(x, y, perm)


def _per_experience_subset(
    x: Tensor, y: Tensor, experiences: Sequence[Sequence[int]], n: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Keep ``n`` samples (stratified by class) of each experience's classes."""
    keep = []
    for classes in experiences:
        idx = torch.nonzero(torch.isin(y, torch.tensor(list(classes)))).flatten()
        keep.append(idx[_stratified_subset(y[idx], n, gen)])
    order = torch.sort(torch.cat(keep)).values
    return x[order], y[order]


# --- streams ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamInfo:
    """What a model needs to know about a stream.

    Attributes
    ----------
    name, scenario : str
        The stream and the scenario asked for: ``"class"``, ``"task"`` (task labels ``t`` in
        every batch) or ``"domain"``.
    input_shape : tuple of int
        Shape of one input without the batch dimension: ``(64,)`` or ``(1, 28, 28)``.
    n_classes : int
        Number of labels one head predicts: labels ``y`` lie in ``[0, n_classes)``. All classes in
        the class scenario; the classes of one experience in the task scenario of split streams
        (Avalanche's ``class_ids_from_zero_in_each_exp``).
    n_experiences : int
        Experiences in the train (and test) stream.
    incremental : str
        ``"class"``, ``"task"`` or ``"domain"`` (``permuted-fmnist`` without task labels).
    classes_per_experience : tuple of tuple of int
        Original class ids of each experience; in the task scenario of split streams, label
        ``j`` of experience ``k`` is original class ``classes_per_experience[k][j]``.
    n_train, n_test : int
        Samples in the whole train and test streams.
    permutations : tuple of Tensor or None
        ``permuted-fmnist`` only: experience ``k`` shows ``x.reshape(-1)[permutations[k]]``.
    """

    name: str
    scenario: str
    input_shape: tuple[int, ...]
    n_classes: int
    n_experiences: int
    incremental: str
    classes_per_experience: tuple[tuple[int, ...], ...]
    n_train: int
    n_test: int
    permutations: tuple[Tensor, ...] | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields (the permutations are left out)."""
        return {
            "name": self.name,
            "scenario": self.scenario,
            "input_shape": list(self.input_shape),
            "n_classes": self.n_classes,
            "n_experiences": self.n_experiences,
            "incremental": self.incremental,
            "classes_per_experience": [list(c) for c in self.classes_per_experience],
            "n_train": self.n_train,
            "n_test": self.n_test,
        }


def make_stream(
    name: str,
    *,
    scenario: str = "class",
    n_experiences: int | None = None,
    seed: int = 0,
    data_root: str | Path | None = None,
    train_per_exp: int | None = None,
    test_per_exp: int | None = None,
) -> tuple[Any, StreamInfo]:
    """Build an Avalanche benchmark whose batches are ``(x, y, t)``.

    Parameters
    ----------
    name : str
        ``"split-digits"`` (default 5 experiences of 2 classes), ``"split-fmnist"`` (5) or
        ``"permuted-fmnist"`` (domain-incremental, 10 pixel permutations of all classes).
    scenario : str
        ``"class"``: one task label (0), labels keep their class ids. ``"task"``: experience ``k``
        has task label ``k``; split streams relabel classes from 0 in each experience.
        ``"domain"`` (``permuted-fmnist`` only) is another name of its ``"class"`` scenario.
    n_experiences : int, optional
        Number of experiences; split streams need a divisor of 10.
    seed : int
        Class order of split streams, permutations and subsampling.
    data_root : str or Path, optional
        Folder with Fashion-MNIST's IDX files (see :func:`load_fashion_mnist`).
    train_per_exp, test_per_exp : int, optional
        Keep about this many training / test samples per experience (stratified by class).

    Returns
    -------
    tuple
        The Avalanche benchmark (``train_stream``, ``test_stream``) and its :class:`StreamInfo`.
    """
    if name not in STREAMS:
        raise ValueError(f"unknown stream {name!r}; choose one of {sorted(STREAMS)}")
    if scenario == "domain" and name != "permuted-fmnist":
        raise ValueError(f"scenario 'domain' is permuted-fmnist's only; {name} is class- or "
                         "task-incremental")
    if scenario not in (*SCENARIOS, "domain"):
        raise ValueError(f"scenario must be one of {SCENARIOS}, got {scenario!r}")
    n_exp = STREAMS[name] if n_experiences is None else int(n_experiences)
    if n_exp < 1:
        raise ValueError(f"n_experiences must be at least 1, got {n_experiences}")
    for arg, value in (("train_per_exp", train_per_exp), ("test_per_exp", test_per_exp)):
        if value is not None and value < 1:
            raise ValueError(f"{arg} must be a positive number of samples, got {value}")
    gen = torch.Generator().manual_seed(seed)
    task = scenario == "task"

    if name == "permuted-fmnist":
        x_tr, y_tr, x_te, y_te = load_fashion_mnist(data_root)
        from avalanche.benchmarks import nc_benchmark  # slow import: after the data is found

        perms = tuple(torch.randperm(x_tr[0].numel(), generator=gen) for _ in range(n_exp))
        train_sets, test_sets = [], []
        for perm in perms:
            train_sets.append(_permuted_set(x_tr, y_tr, perm, train_per_exp, gen))
            test_sets.append(_permuted_set(x_te, y_te, perm, test_per_exp, gen))
        bench = nc_benchmark(
            train_sets, test_sets, n_experiences=n_exp, task_labels=task, shuffle=False,
            one_dataset_per_exp=True, class_ids_from_zero_in_each_exp=True,
        )
        n_classes = int(torch.unique(y_tr).numel())
        classes = tuple(tuple(range(n_classes)) for _ in range(n_exp))
        info = StreamInfo(
            name=name, scenario=scenario, input_shape=tuple(x_tr.shape[1:]),
            n_classes=n_classes, n_experiences=n_exp, incremental="task" if task else "domain",
            classes_per_experience=classes, n_train=sum(len(d) for d in train_sets),
            n_test=sum(len(d) for d in test_sets), permutations=perms,
        )
        return bench, info

    if name == "split-digits":
        x_tr, y_tr, x_te, y_te = load_digits_tensors()
    else:
        x_tr, y_tr, x_te, y_te = load_fashion_mnist(data_root)
    from avalanche.benchmarks import nc_benchmark

    all_classes = sorted(torch.unique(y_tr).tolist())
    if len(all_classes) % n_exp:
        raise ValueError(
            f"{name} has {len(all_classes)} classes: n_experiences must divide it, got {n_exp}"
        )
    per_exp = len(all_classes) // n_exp
    order = [all_classes[i] for i in torch.randperm(len(all_classes), generator=gen).tolist()]
    experiences = [order[k * per_exp:(k + 1) * per_exp] for k in range(n_exp)]
    if train_per_exp:
        x_tr, y_tr = _per_experience_subset(x_tr, y_tr, experiences, train_per_exp, gen)
    if test_per_exp:
        x_te, y_te = _per_experience_subset(x_te, y_te, experiences, test_per_exp, gen)
    train_set = TensorClassificationSet(x_tr, y_tr)
    test_set = TensorClassificationSet(x_te, y_te)
    bench = nc_benchmark(
        train_set, test_set, n_experiences=n_exp, task_labels=task, shuffle=False,
        fixed_class_order=order, class_ids_from_zero_in_each_exp=task,
    )
    classes = tuple(tuple(c) for c in experiences)
    info = StreamInfo(
        name=name, scenario=scenario, input_shape=tuple(x_tr.shape[1:]),
        n_classes=per_exp if task else len(all_classes), n_experiences=n_exp,
        incremental=scenario, classes_per_experience=classes, n_train=len(train_set),
        n_test=len(test_set),
    )
    return bench, info


def stream_names() -> Sequence[str]:
    """Names accepted by :func:`make_stream`."""
    return tuple(STREAMS)
