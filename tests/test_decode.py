"""Fast CPU decoders and batched (GPU) JPEG decoding: agreement with a full-size decode, EXIF, skip-and-count."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

from byol_wrapper.data import ImageFolderDataset, collate_skip_none
from byol_wrapper.decode import (
    EncodedImages,
    FastDecode,
    GPUDecodedBatches,
    apply_orientation,
    collate_encoded,
    decode_image_file,
    resolve_decode,
)

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")  # real photos, 451x300 to 640x427
MAD_BOUND = 3.0  # grey levels (of 255) per pixel, averaged over the image and over the photos
MAD_BOUND_ONE = 6.0  # the same for any one photo (fine fur texture decoded at 1/8 DCT scale reaches ~5)


def _photos() -> list[np.ndarray]:
    data = pytest.importorskip("skimage.data")  # in the [test] extra
    return [getattr(data, name)() for name in PHOTOS]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for name, arr in zip(PHOTOS, _photos()):
        Image.fromarray(arr).save(root / f"{name}.jpg", quality=90)
    return root


def _reference(path: Path, size: int, mode: str = "RGB") -> np.ndarray:
    """Plain Pillow: full-size decode, EXIF transpose, ImageOps.fit bilinear (no draft)."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img.convert(mode))
        img = ImageOps.fit(img, (size, size), method=Image.BILINEAR)
    arr = np.asarray(img)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


@pytest.mark.parametrize("size", [32, 96, 224])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_fast_decode_matches_full_size_decode_and_resize_on_photos(photo_dir: Path, size: int, mode: str) -> None:
    mads = []
    for path in sorted(photo_dir.glob("*.jpg")):
        fast = decode_image_file(path, size, mode)
        ref = _reference(path, size, mode)
        assert fast.dtype == torch.uint8 and tuple(fast.shape) == ref.shape
        mads.append(np.abs(fast.numpy().astype(np.float64) - ref).mean())
        assert mads[-1] < MAD_BOUND_ONE, (path.name, size, mode, mads[-1])
    assert np.mean(mads) < MAD_BOUND, (size, mode, mads)


def test_decoder_choice_per_scale(photo_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's libjpeg-turbo decode where no DCT scale fits (224 px from <448 px), Pillow draft below."""
    import torchvision.io

    calls: list[int] = []
    real = torchvision.io.decode_jpeg

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", spy)
    path = photo_dir / "chelsea.jpg"  # 451x300
    decode_image_file(path, 224)
    assert calls == [1]
    decode_image_file(path, 32)  # 1/8 DCT scale fits: Pillow draft
    assert calls == [1]


def test_non_jpeg_formats_use_the_reference_decoder(tmp_path: Path) -> None:
    arr = _photos()[1]
    Image.fromarray(arr).save(tmp_path / "coffee.png")
    Image.fromarray(arr).save(tmp_path / "fake.png", format="JPEG")  # content decides, not the extension
    ds = ImageFolderDataset(tmp_path, 48)
    fast = FastDecode(ds)
    png = ds.files.index(tmp_path / "coffee.png")
    assert torch.equal(fast[png][0], ds[png][0])
    fake = ds.files.index(tmp_path / "fake.png")
    assert np.abs(fast[fake][0].numpy().astype(float) - _reference(tmp_path / "fake.png", 48)).mean() < MAD_BOUND


def _exif_jpeg(arr: np.ndarray, orientation: int) -> bytes:
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92, exif=exif.tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_apply_orientation_matches_pil_exif_transpose(orientation: int) -> None:
    arr = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(4, 5, 3) * 4
    with Image.open(io.BytesIO(_exif_jpeg(arr, orientation))) as img:
        want = np.asarray(ImageOps.exif_transpose(img.convert("RGB"))).transpose(2, 0, 1)
    with Image.open(io.BytesIO(_exif_jpeg(arr, 1))) as img:
        upright = torch.from_numpy(np.asarray(img.convert("RGB")).transpose(2, 0, 1).copy())
    assert torch.equal(apply_orientation(upright, orientation), torch.from_numpy(want.copy()))


@pytest.mark.parametrize("size", [32, 224])
def test_exif_orientation_applied_on_both_cpu_paths(tmp_path: Path, size: int) -> None:
    arr = _photos()[1]  # coffee, landscape; the cup's orientation must follow the tag
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_exif_jpeg(arr, 6))
    fast = decode_image_file(path, size).numpy().astype(np.float64)
    assert np.abs(fast - _reference(path, size)).mean() < MAD_BOUND
    unrotated = np.asarray(ImageOps.fit(Image.fromarray(arr), (size, size), method=Image.BILINEAR)).transpose(2, 0, 1)
    assert np.abs(fast - unrotated).mean() > 4 * MAD_BOUND  # the tag was not ignored


def _mixed_folder(root: Path) -> Path:
    photos = _photos()
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(photos[0]).save(root / "a" / "0.jpg", quality=90)
    (root / "a" / "1.jpg").write_bytes(_exif_jpeg(photos[2], 8))
    Image.fromarray(photos[1]).save(root / "b" / "2.png")
    (root / "b" / "3.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"garbage" * 50)  # JPEG magic, corrupt body
    (root / "b" / "4.jpg").write_bytes(b"not an image")
    Image.fromarray(photos[3]).save(root / "b" / "5.jpg", quality=90)
    return root


def test_fast_decode_skips_and_counts_unreadable_files(tmp_path: Path) -> None:
    ds = FastDecode(ImageFolderDataset(_mixed_folder(tmp_path), 32))
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        images, labels, skipped = collate_skip_none([ds[i] for i in range(len(ds))])
    assert skipped == 2 and images.shape == (4, 3, 32, 32) and labels.tolist() == [0, 0, 1, 1]


def test_batched_decode_matches_cpu_decode_and_counts_skips(tmp_path: Path) -> None:
    """The GPU path's logic, run on the CPU device: same images, labels and skip count as the CPU path."""
    folder = ImageFolderDataset(_mixed_folder(tmp_path), 40)
    loader = DataLoader(EncodedImages(folder), batch_size=6, collate_fn=collate_encoded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(GPUDecodedBatches(loader, 40, "RGB", torch.device("cpu")))
        want, want_labels, want_skipped = collate_skip_none([FastDecode(folder)[i] for i in range(len(folder))])
    assert sum("skipping unreadable image" in str(w.message) for w in caught) == 4  # 2 files x 2 paths
    (images, labels, skipped), = batches
    assert skipped == want_skipped == 2 and labels.tolist() == want_labels.tolist()
    assert images.shape == want.shape
    assert (images.float() - want.float()).abs().mean() < MAD_BOUND


def test_resolve_decode_falls_back_with_one_info_line() -> None:
    lines: list[str] = []
    assert resolve_decode("gpu", torch.device("cpu"), lines.append) == "cpu"
    assert len(lines) == 1 and lines[0].startswith("info: decoding images on the CPU")
    assert resolve_decode("auto", torch.device("cpu"), lines.append) == "cpu"
    assert resolve_decode("cpu", torch.device("cpu"), lines.append) == "cpu"
    assert len(lines) == 1  # nothing to fall back from: no line
    with pytest.raises(ValueError, match="decode must be one of"):
        resolve_decode("nvjpeg", torch.device("cpu"))


@pytest.mark.gpu
def test_gpu_decode_matches_cpu_decode(tmp_path: Path) -> None:
    device = torch.device("cuda")
    assert resolve_decode("auto", device, print) == "gpu"
    folder = ImageFolderDataset(_mixed_folder(tmp_path), 96)
    loader = DataLoader(EncodedImages(folder), batch_size=6, collate_fn=collate_encoded, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (images, labels, skipped), = list(GPUDecodedBatches(loader, 96, "RGB", device))
        want, want_labels, want_skipped = collate_skip_none([FastDecode(folder)[i] for i in range(len(folder))])
    assert images.device.type == "cuda" and images.dtype == torch.uint8
    assert skipped == want_skipped and labels.tolist() == want_labels.tolist()
    assert (images.cpu().float() - want.float()).abs().mean() < MAD_BOUND  # nvJPEG's IDCT differs slightly


@pytest.mark.gpu
def test_gpu_decode_cli_trains(tmp_path: Path) -> None:
    from byol_wrapper.train import main

    data = _mixed_folder(tmp_path / "data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main([
            "--data", str(data), "--out", str(tmp_path / "out"), "--backbone", "resnet18", "--image-size", "32",
            "--batch-size", "3", "--max-steps", "2", "--workers", "1", "--device", "cuda", "--decode", "gpu",
            "--projection-hidden-size", "32", "--no-progress",
        ])
    assert rc == 0
