"""Fashion-MNIST: reading its idx files and seeding a store with it as an ImageFolder."""

import gzip
import io
import os
import struct

import numpy as np
import pytest
from PIL import Image

from quantlab import data, demo
from quantlab.errors import ConfigError, DataError
from quantlab.store import Store

CLASSES = ["0-t-shirt-top", "1-trouser", "2-pullover", "3-dress", "4-coat", "5-sandal",
           "6-shirt", "7-sneaker", "8-bag", "9-ankle-boot"]


def _write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    """An idx file as the dataset releases them: 0, 0, type 0x08, ndim, big-endian dims, data."""
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    with (gzip.open(str(path) + ".gz", "wb") if compress else open(path, "wb")) as f:
        f.write(raw)


@pytest.fixture
def idx_dir(tmp_path):
    """Fake Fashion-MNIST: 20 train images (2 per class) and 10 test images (1 per class)."""
    rng = np.random.default_rng(0)
    src = tmp_path / "fashion"
    src.mkdir()
    for split, per_class in (("train", 2), ("t10k", 1)):
        labels = np.tile(np.arange(10), per_class)
        images = rng.integers(0, 256, size=(len(labels), 28, 28))
        _write_idx(src / f"{split}-images-idx3-ubyte", images)
        _write_idx(src / f"{split}-labels-idx1-ubyte", labels)
    return src


def _pixels(store: Store, rel: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(store.read_bytes(rel))))


def test_seed_fashion_mnist_writes_an_image_folder_once(idx_dir, tmp_path):
    store = Store(str(tmp_path / "store"))
    uri, written = data.seed_fashion_mnist(store, str(idx_dir))
    assert written and uri == store.uri("datasets/fashion-mnist")
    staged = data.stage(uri, str(tmp_path / "cache"))
    assert staged.classes == CLASSES and (staged.num_train, staged.num_val) == (20, 10)
    # Image 13 of train is label 3 (np.tile): its pixels, in the folder of its label.
    labels_train = data.read_idx(str(idx_dir / "train-labels-idx1-ubyte.gz"))
    images_train = data.read_idx(str(idx_dir / "train-images-idx3-ubyte.gz"))
    assert labels_train[13] == 3
    np.testing.assert_array_equal(_pixels(store, "datasets/fashion-mnist/train/3-dress/00013.png"),
                                  images_train[13])
    folder = data.image_folder(staged, "val", transform=None)
    assert [folder.classes[t] for t in folder.targets] == CLASSES  # ImageFolder label = idx label
    assert data.seed_fashion_mnist(store, str(idx_dir)) == (uri, False)


def test_max_per_class_and_uncompressed_files(idx_dir, tmp_path):
    for name in os.listdir(idx_dir):  # the files as torchvision's raw/ folder holds them
        with gzip.open(idx_dir / name) as f, open(idx_dir / name.removesuffix(".gz"), "wb") as out:
            out.write(f.read())
        os.remove(idx_dir / name)
    store = Store(str(tmp_path / "store"))
    data.seed_fashion_mnist(store, str(idx_dir), name="fm", max_per_class=1)
    files = [f.relpath for f in store.find("datasets/fm") if f.relpath.endswith(".png")]
    assert sum(f.startswith("train/") for f in files) == 10
    assert sum(f.startswith("val/") for f in files) == 10
    with pytest.raises(DataError, match="max_per_class must be >= 1"):
        data.seed_fashion_mnist(store, str(idx_dir), name="fm2", max_per_class=0)


def test_missing_files_say_where_and_how_to_get_them(tmp_path):
    store = Store(str(tmp_path / "store"))
    with pytest.raises(DataError) as e:
        data.seed_fashion_mnist(store, str(tmp_path / "nowhere"))
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "nowhere") in message
    assert "train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert not store.find("")  # nothing written
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        demo.seed(store, "fashion-mnist", source=str(tmp_path / "nowhere"))


def test_broken_idx_files_are_named(idx_dir, tmp_path):
    images = idx_dir / "t10k-images-idx3-ubyte.gz"
    with gzip.open(images, "wb") as f:
        f.write(b"PNG? no")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is not an idx file"):
        data.seed_fashion_mnist(Store(str(tmp_path / "s1")), str(idx_dir))
    _write_idx(idx_dir / "t10k-images-idx3-ubyte", np.zeros((10, 28, 28)))
    with gzip.open(images) as f:
        raw = f.read()
    with gzip.open(images, "wb") as f:
        f.write(raw[:-100])
    with pytest.raises(DataError, match="truncated"):
        data.seed_fashion_mnist(Store(str(tmp_path / "s2")), str(idx_dir))
    _write_idx(idx_dir / "t10k-images-idx3-ubyte", np.zeros((9, 28, 28)))  # 9 images, 10 labels
    with pytest.raises(DataError, match="not a Fashion-MNIST pair"):
        data.seed_fashion_mnist(Store(str(tmp_path / "s3")), str(idx_dir))


def test_unknown_demo_dataset():
    with pytest.raises(ConfigError, match="unknown demo dataset 'cifar'; valid: digits, fashion-mnist"):
        demo.recipe("cifar")


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR),
                    reason=f"Fashion-MNIST is not installed in {data.FASHION_MNIST_DIR} "
                           "(apt-get install dataset-fashion-mnist)")
def test_a_slice_of_the_real_dataset(tmp_path):
    store = Store(str(tmp_path / "store"))
    uri, _ = data.seed_fashion_mnist(store, max_per_class=3)
    staged = data.stage(uri, str(tmp_path / "cache"))
    assert staged.classes == CLASSES and (staged.num_train, staged.num_val) == (30, 30)
    # The dataset's first training image and its first test image are both ankle boots.
    assert store.exists("datasets/fashion-mnist/train/9-ankle-boot/00000.png")
    assert store.exists("datasets/fashion-mnist/val/9-ankle-boot/00000.png")
    pixels = _pixels(store, "datasets/fashion-mnist/train/9-ankle-boot/00000.png")
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8 and pixels.max() > 200
