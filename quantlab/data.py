"""Datasets: the ImageFolder layout, transforms, loaders, staging, and the bundled digits.

Data is an ImageFolder with train/ and val/ splits, one folder per class, which is also how
ImageNet is laid out after the usual preparation:

    <uri>/train/<class>/<image>.{png,jpg,...}
    <uri>/val/<class>/<image>...

`stage()` brings a dataset from any store URI into a local cache keyed by its content, in
parallel, and skips what is already there; it decodes every image once per dataset version, so
that a broken file is named before any expensive work (or left out, with `skip_bad_images`).
`loader()` builds DataLoaders over the staged copy.
`seed_digits()` writes scikit-learn's 1,797 real handwritten digits in that layout (the demo's
default), `seed_fashion_mnist()` the 70,000 Fashion-MNIST images from their idx files.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import logging
import math
import os
import posixpath
import re
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torchvision import datasets, transforms

from quantlab import store as st
from quantlab.config import DataConfig, TransformConfig
from quantlab.errors import DataError

log = logging.getLogger(__name__)
SPLITS = ("train", "val")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
STAGED_MARKER = ".quantlab-staged.json"   # in a staged copy: it is complete
IMAGES_RECORD = ".images.json"            # <cache>/datasets/<fingerprint>.images.json: decode check
SEEDED_MARKER = ".quantlab-seeded.json"   # in the store: the demo dataset is complete


class StagedData(BaseModel):
    """A dataset ready to read from local disk, and the fingerprint of its content."""

    uri: str            # where it came from
    local_path: str     # where it is now (the source itself when it is already local)
    fingerprint: str    # sha256 over (relative path, size, content tag) of every file
    classes: list[str]
    num_train: int
    num_val: int
    num_bytes: int
    staged_files: int   # files downloaded by this call (0 when everything was cached)
    seconds: float
    skipped: list[str] = []  # undecodable images left out (relative paths), with skip_bad_images


# -- layout ------------------------------------------------------------------------------
def check_layout(files: list[st.FileInfo], uri: str) -> tuple[list[str], dict[str, int]]:
    """Validate train/ and val/ with the same class folders; return (classes, counts)."""
    if not files:
        raise DataError(f"dataset {uri} is missing or empty; expected train/<class>/<image> and "
                        "val/<class>/<image>")
    classes: dict[str, set[str]] = {s: set() for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    for f in files:
        if is_image(f.relpath):
            split, cls, _ = f.relpath.split("/")
            classes[split].add(cls)
            counts[split] += 1
    for split in SPLITS:
        if not counts[split]:
            raise DataError(f"dataset {uri} has no images under {split}/; expected "
                            f"{split}/<class>/<image> with extensions {', '.join(IMAGE_EXTENSIONS)}")
    check_same_classes(classes["train"], classes["val"], uri)
    return sorted(classes["train"]), counts


def check_same_classes(train: Iterable[str], val: Iterable[str], uri: str) -> None:
    """Refuse a dataset whose train/ and val/ class folders differ, naming some of each."""
    train, val = set(train), set(val)
    if train != val:
        only_train = sorted(train - val)[:5]
        only_val = sorted(val - train)[:5]
        raise DataError(f"dataset {uri}: classes differ between train/ and val/ (only in train: "
                        f"{only_train or 'none'}; only in val: {only_val or 'none'})")


def check_no_empty_classes(splits: dict[str, list[str]], files: list[st.FileInfo],
                           uri: str) -> None:
    """Refuse class folders ({split: [class, ...]}) that hold no image (ImageFolder would stop
    on them mid-run), naming the first."""
    with_images = {(p[0], p[1]) for f in files if is_image(f.relpath)
                   for p in [f.relpath.split("/")]}
    empty = [f"{split}/{cls}" for split, classes in splits.items() for cls in classes
             if (split, cls) not in with_images]
    if empty:
        more = f" (and {len(empty) - 1} more class folders without images)" if len(empty) > 1 else ""
        raise DataError(f"dataset {uri}: {empty[0]} has no images{more}; every class folder "
                        f"needs at least one image with an extension of {', '.join(IMAGE_EXTENSIONS)}")


def is_image(relpath: str) -> bool:
    """Is this path (relative to the dataset) an image that ImageFolder loads?"""
    parts = relpath.split("/")
    return (len(parts) == 3 and parts[0] in SPLITS and not parts[2].startswith(".")
            and parts[2].lower().endswith(IMAGE_EXTENSIONS))


def fingerprint(files: list[st.FileInfo]) -> str:
    """Content fingerprint of a listing: any added, removed, resized or rewritten file changes it."""
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: f.relpath):
        h.update(f"{f.relpath}\0{f.size}\0{f.etag}\n".encode())
    return h.hexdigest()


def list_dataset(uri: str, storage_options: dict | None = None) -> list[st.FileInfo]:
    """Every data file below a dataset URI, from one recursive listing.

    Hidden files (our markers, .DS_Store, ...) are not data.
    """
    return [f for f in st.list_files(uri, storage_options)
            if not any(part.startswith(".") for part in f.relpath.split("/"))]


def dataset_fingerprint(uri: str, storage_options: dict | None = None) -> str:
    """The content fingerprint of a dataset, from its listing alone (nothing is downloaded)."""
    return fingerprint(list_dataset(uri, storage_options))


# -- staging -----------------------------------------------------------------------------
def stage(uri: str, cache_dir: str, storage_options: dict | None = None,
          on_progress: Callable[[int, int], None] | None = None,
          skip_bad_images: bool = False) -> StagedData:
    """Make a dataset readable from local disk, verified, skipping what is already staged.

    Local datasets are read in place (fingerprinted, not copied). Remote ones (s3://,
    memory://, ...) are listed once, recursively, and downloaded concurrently into
    `<cache_dir>/datasets/<fingerprint>/`. A download that is interrupted resumes: files
    already present with the right size are kept. When the counts and sizes check out, a
    staging manifest (.quantlab-staged.json) marks the copy complete.

    Every image is then decoded once per dataset version (see `find_bad_images`; the result
    is cached under the fingerprint). An undecodable image raises a DataError naming it, or,
    with `skip_bad_images`, is left out of every loader and listed in `StagedData.skipped`.
    """
    start = time.perf_counter()
    files = list_dataset(uri, storage_options)
    classes, counts = check_layout(files, uri)
    fp = fingerprint(files)
    total_bytes = sum(f.size for f in files)
    if st.is_local(uri):
        local = st.normalize_uri(uri)
        downloaded = 0
    else:
        local = os.path.join(os.path.expanduser(cache_dir), "datasets", fp[:32])
        marker = os.path.join(local, STAGED_MARKER)
        with _exclusive(local + ".lock"):  # two runs staging the same data take turns
            downloaded = _download(uri, files, local, marker, fp, storage_options, on_progress)
    bad = _checked_images(local, files, cache_dir, fp)
    if bad:
        examples = "; ".join(f"{posixpath.join(uri, rel)} ({why})" for rel, why in sorted(bad.items())[:3])
        if not skip_bad_images:
            raise DataError(f"{len(bad)} image(s) in {uri} cannot be decoded: {examples}; fix or "
                            "remove them, or leave them out with --skip-bad-images "
                            "(data.skip_bad_images: true)")
        log.warning("leaving out %d undecodable image(s) of %s: %s", len(bad), uri, examples)
        left = {tuple(f.relpath.split("/")[:2]) for f in files
                if is_image(f.relpath) and f.relpath not in bad}
        empty = [f"{split}/{c}/" for split in SPLITS for c in classes if (split, c) not in left]
        if empty:
            raise DataError(f"dataset {uri}: without its undecodable images, "
                            f"{', '.join(empty[:5])} would have no images left")
        counts = {s: counts[s] - sum(rel.startswith(f"{s}/") for rel in bad) for s in SPLITS}
    return StagedData(uri=uri, local_path=local, fingerprint=fp, classes=classes,
                      num_train=counts["train"], num_val=counts["val"], num_bytes=total_bytes,
                      staged_files=downloaded, seconds=time.perf_counter() - start,
                      skipped=sorted(bad))


# -- the decode check ----------------------------------------------------------------------
def check_image(path: str) -> str | None:
    """None if the image decodes as the loader will read it, else why not (one line).

    JPEGs decode in draft mode (at 1/8 scale, by libjpeg's DCT scaling): every byte of the
    compressed stream is still read and entropy-decoded, so truncated or corrupt files fail as
    they would in a full decode, at about half its cost. Other formats decode fully.
    """
    try:
        with Image.open(path) as im:
            im.draft("RGB", (1, 1))
            im.load()
            im.convert("RGB")  # what torchvision's loader does next
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        text = str(e).replace(f" {path!r}", "").strip().splitlines()  # the caller names the file
        return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def find_bad_images(root: str, relpaths: list[str], num_threads: int | None = None,
                    chunk_size: int = 4096) -> dict[str, str]:
    """Decode images below `root` in threads (PIL decodes without the GIL); {relpath: why}."""
    num_threads = num_threads or min(32, 2 * (os.cpu_count() or 1))
    bad: dict[str, str] = {}
    last_report = time.monotonic()
    with ThreadPoolExecutor(num_threads, thread_name_prefix="quantlab-decode") as pool:
        for i in range(0, len(relpaths), chunk_size):
            chunk = relpaths[i:i + chunk_size]
            paths = [os.path.join(root, *rel.split("/")) for rel in chunk]
            for rel, why in zip(chunk, pool.map(check_image, paths)):
                if why is not None:
                    bad[rel] = why
            if time.monotonic() - last_report > 30:
                log.info("decoded %d/%d images (%d undecodable)", i + len(chunk), len(relpaths),
                         len(bad))
                last_report = time.monotonic()
    return bad


def _checked_images(local: str, files: list[st.FileInfo], cache_dir: str, fp: str) -> dict[str, str]:
    """Undecodable images of a staged dataset, decoded once per fingerprint (then cached)."""
    record = os.path.join(os.path.expanduser(cache_dir), "datasets", fp[:32] + IMAGES_RECORD)
    with _exclusive(record + ".lock"):
        cached = _read_marker(record)
        if cached.get("fingerprint") == fp:
            return cached["bad"]
        images = [f.relpath for f in files if is_image(f.relpath)]
        start = time.perf_counter()
        bad = find_bad_images(local, images)
        log.info("decoded %d images of %s in %.1fs: %d undecodable", len(images), local,
                 time.perf_counter() - start, len(bad))
        _write_json(record, {"fingerprint": fp, "root": local, "num_images": len(images),
                             "bad": bad, "checked_at": time.time()})
    return bad


def _download(uri: str, files: list[st.FileInfo], local: str, marker: str, fp: str,
              storage_options: dict | None,
              on_progress: Callable[[int, int], None] | None) -> int:
    """Download what is missing, verify, write the staging marker; returns files downloaded."""
    if _read_marker(marker).get("fingerprint") == fp:
        return 0
    todo = [f for f in files if not _has_file(local, f)]
    log.info("staging %d of %d files (%.1f MB) from %s", len(todo), len(files),
             sum(f.size for f in todo) / 1e6, uri)
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        if on_progress:
            on_progress(min(done, len(todo)), len(todo))
    st.download(uri, todo, local, storage_options, on_progress=progress)
    bad = [f.relpath for f in files if not _has_file(local, f)]
    if bad:
        raise DataError(f"staging {uri} left {len(bad)} files missing or truncated "
                        f"(e.g. {', '.join(bad[:3])}); re-run to resume")
    _write_json(marker, {"uri": uri, "fingerprint": fp, "num_files": len(files),
                         "num_bytes": sum(f.size for f in files), "staged_at": time.time()})
    return len(todo)


def _has_file(root: str, f: st.FileInfo) -> bool:
    return st.has_copy(os.path.join(root, *f.relpath.split("/")), f)


@contextmanager
def _exclusive(path: str) -> Iterator[None]:
    """An exclusive advisory lock on a file, between processes of this machine."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json(path: str, obj: dict) -> None:
    """Write a small local JSON record atomically (callers hold its lock)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def _read_marker(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


# -- transforms and loaders --------------------------------------------------------------
def build_transform(cfg: TransformConfig, train: bool) -> transforms.Compose:
    """The tutorial's transforms (for 224 input: resize 256, crop 224, ImageNet mean/std),
    after `cfg.pad` pixels of zero padding on each side when asked."""
    normalize = transforms.Normalize(cfg.mean, cfg.std)
    pad = [transforms.Pad(cfg.pad)] if cfg.pad else []
    if train:
        steps = [transforms.RandomResizedCrop(cfg.input_size, scale=cfg.train_crop_scale)]
        if cfg.hflip:
            steps.append(transforms.RandomHorizontalFlip())
    else:
        steps = [transforms.Resize(cfg.eval_resize), transforms.CenterCrop(cfg.input_size)]
    return transforms.Compose([*pad, *steps, transforms.ToTensor(), normalize])


class _CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder whose decode errors name the file."""

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            path = self.samples[index][0]
            raise DataError(f"cannot decode image {path}: {e}") from None


def image_folder(staged: StagedData, split: str, transform) -> datasets.ImageFolder:
    """An ImageFolder over a staged split: the images staging counted, without skipped ones."""
    root = os.path.join(staged.local_path, split)
    if not os.path.isdir(root):
        raise DataError(f"dataset {staged.uri} has no {split}/ folder")
    skipped = set(staged.skipped)

    def usable(path: str) -> bool:
        rel = os.path.relpath(path, staged.local_path).replace(os.sep, "/")
        return is_image(rel) and rel not in skipped
    ds = _CheckedImageFolder(root, transform=transform, is_valid_file=usable)
    if ds.classes != staged.classes:
        raise DataError(f"{root}: classes changed since staging; re-stage the dataset")
    return ds


def loader(staged: StagedData, cfg: DataConfig, split: str, train: bool,
           batch_size: int | None = None, max_images: int | None = None,
           distributed: bool = False, seed: int = 0,
           shard: tuple[int, int, int | None] | None = None) -> DataLoader:
    """A DataLoader over a staged split.

    train=True: training transforms and shuffling (a DistributedSampler when `distributed`,
    so that each rank sees a distinct shard; call `loader.sampler.set_epoch(e)` per epoch).
    train=False: eval transforms, fixed order. `max_images` takes a fixed, seeded subset.
    `shard=(rank, world_size, limit)`: of the first `limit` images (None: all), in order, the
    images i with i % world_size == rank (no padding: the shards add up to the whole).
    """
    ds = image_folder(staged, split, build_transform(cfg.transforms, train=train))
    if max_images is not None and max_images < len(ds):
        g = torch.Generator().manual_seed(seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[:max_images].tolist())
    if shard is not None:
        rank, world_size, limit = shard
        ds = Subset(ds, list(range(rank, min(len(ds), limit or len(ds)), world_size)))
    sampler = DistributedSampler(ds, shuffle=train, seed=seed, drop_last=False) if distributed else None
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size or (cfg.batch_size if train else cfg.eval_batch_size),
                      shuffle=train and sampler is None, sampler=sampler, generator=g,
                      num_workers=cfg.num_workers, drop_last=False,
                      persistent_workers=cfg.num_workers > 0)


# -- the demo datasets ---------------------------------------------------------------------
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts it
FASHION_MNIST_FILES = {  # split -> (images, labels): the dataset's own release names
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def seed_digits(store: st.Store, name: str = "digits", val_fraction: float = 0.2,
                seed: int = 0) -> tuple[str, bool]:
    """Write scikit-learn's 1,797 handwritten digits as an ImageFolder of 8x8 PNGs.

    train/ and val/ are split per class with a fixed seed. Returns (uri, written); nothing is
    written when a complete copy is already in the store.
    """
    def samples() -> Iterator[tuple[str, np.ndarray]]:
        from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

        digits = load_digits()
        rng = np.random.default_rng(seed)
        for label in range(10):
            idx = np.flatnonzero(digits.target == label)
            rng.shuffle(idx)
            num_val = round(len(idx) * val_fraction)
            for k, i in enumerate(idx):
                split = "val" if k < num_val else "train"
                pixels = np.clip(digits.images[i] * 16, 0, 255).astype(np.uint8)  # 0..16 -> 0..255
                yield f"{split}/{label}/{i:04d}.png", pixels

    return _seed_image_folder(store, name, samples, {
        "source": "sklearn.datasets.load_digits", "val_fraction": val_fraction, "seed": seed})


def seed_fashion_mnist(store: st.Store, source_dir: str = FASHION_MNIST_DIR,
                       name: str = "fashion-mnist",
                       max_per_class: int | None = None) -> tuple[str, bool]:
    """Write Fashion-MNIST's 70,000 28x28 images (its four idx files) as an ImageFolder of PNGs.

    train/ holds the dataset's 60,000 training images and val/ its 10,000 test images, in
    class folders `0-t-shirt-top` ... `9-ankle-boot` (torchvision's class names, numbered so
    that ImageFolder's sorted order is the dataset's label order). `source_dir` holds the files
    as the dataset releases them (`train-images-idx3-ubyte.gz`, ...; uncompressed also works).
    `max_per_class` keeps the first N images of each class in each split. Returns (uri,
    written); nothing is read or written when a complete copy is already in the store.
    """
    if max_per_class is not None and max_per_class < 1:
        raise DataError(f"max_per_class must be >= 1 or None, got {max_per_class}")
    paths = fashion_mnist_files(source_dir)  # a missing file fails before the store is touched
    classes = [f"{i}-" + "-".join(re.findall(r"[a-z0-9]+", c.lower()))
               for i, c in enumerate(datasets.FashionMNIST.classes)]

    def samples() -> Iterator[tuple[str, np.ndarray]]:
        for split, (images_path, labels_path) in paths.items():
            images, labels = read_idx(images_path), read_idx(labels_path)
            if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) \
                    or images.dtype != np.uint8 or labels.max(initial=0) >= len(classes):
                raise DataError(f"{images_path} and {labels_path} are not a Fashion-MNIST pair "
                                f"(images {images.shape} {images.dtype}, labels {labels.shape}; "
                                f"expected N x 28 x 28 uint8 and N labels 0..{len(classes) - 1})")
            taken = np.zeros(len(classes), dtype=np.int64)
            for i, (pixels, label) in enumerate(zip(images, labels)):
                if max_per_class is not None and taken[label] >= max_per_class:
                    continue
                taken[label] += 1
                yield f"{split}/{classes[label]}/{i:05d}.png", pixels

    return _seed_image_folder(store, name, samples, {
        "source": "Fashion-MNIST idx files", "source_files": {
            split: [os.path.basename(p) for p in pair] for split, pair in paths.items()},
        "max_per_class": max_per_class})


def fashion_mnist_files(source_dir: str) -> dict[str, tuple[str, str]]:
    """The four idx files of Fashion-MNIST in `source_dir` ({split: (images, labels)}), each
    gzipped (as released) or not; a DataError names the folder and how to get them."""
    found, missing = {}, []
    for split, names in FASHION_MNIST_FILES.items():
        pair = []
        for stem in names:
            path = next((p for p in (os.path.join(source_dir, stem + ".gz"),
                                     os.path.join(source_dir, stem)) if os.path.isfile(p)), None)
            if path is None:
                missing.append(stem + ".gz")
            pair.append(path)
        found[split] = tuple(pair)
    if missing:
        raise DataError(f"Fashion-MNIST is not in {source_dir} (missing {', '.join(missing)}); "
                        "install it with `apt-get install dataset-fashion-mnist` (into "
                        f"{FASHION_MNIST_DIR}) or pass the folder that holds its four idx files")
    return found


def read_idx(path: str) -> np.ndarray:
    """An idx file (the MNIST format; gzipped when the name ends in .gz) as a numpy array.

    torchvision's reader (`datasets.mnist.read_image_file`) only opens uncompressed files
    under `<root>/FashionMNIST/raw/`, hence this one.
    """
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    dtype = _IDX_DTYPES.get(raw[2]) if len(raw) >= 4 and raw[:2] == b"\0\0" else None
    if dtype is None or not 1 <= ndim <= 4 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is not an idx file (its header is {raw[:4].hex() or 'empty'})")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    array = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if array.size != math.prod(shape):
        raise DataError(f"{path} is truncated or padded: its header says {shape} "
                        f"({math.prod(shape)} values), it holds {array.size}")
    return array.reshape(shape)


def _seed_image_folder(store: st.Store, name: str,
                       samples: Callable[[], Iterator[tuple[str, np.ndarray]]],
                       record: dict) -> tuple[str, bool]:
    """Write greyscale images ((split/class/file.png, HxW uint8) from `samples()`) as PNGs
    under datasets/<name>/, then the marker that says the copy is complete, unless it is."""
    rel = f"datasets/{name}"
    marker = f"{rel}/{SEEDED_MARKER}"
    if store.exists(marker):
        return store.uri(rel), False
    files: dict[str, bytes] = {}
    for relpath, pixels in samples():
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        files[f"{rel}/{relpath}"] = buf.getvalue()
    store.write_many(files)
    store.write_json(marker, {**record, "num_images": len(files)})
    return store.uri(rel), True

