"""byol-train under faults (issue 10): divergence, two writers, unreadable/foreign checkpoints, bad folders,
EXIF orientation, threads, bad --out/--device and bfloat16 backbones. CPU, 16 px, a few steps."""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import byol_wrapper.checkpoint as ckpt_mod
import byol_wrapper.cli.trainer as train_mod
from byol_wrapper import BYOL
from byol_wrapper.checkpoint import load_checkpoint, load_latest_checkpoint, nonfinite_entries, previous_path, save_checkpoint
from byol_wrapper.data import ImageFolderDataset, find_images
from byol_wrapper.lock import RunLock, RunLockedError
from byol_wrapper.train import EXIT_DIVERGED, main

from tests.test_train import TINY, _write_images  # the same tiny model and image folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_images(tmp_path_factory.mktemp("images") / "data")


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), *TINY, "--image-size", "16", "--batch-size", "4",
        "--projection-size", "16", "--projection-hidden-size", "32", "--workers", "0", "--device", "cpu",
        "--no-progress", "--log-every", "2", "--optimizer", "lars", "--lr", "0.1", "--checkpoint-every", "1", *extra,
    ]


def _run(argv: list[str]) -> tuple[int, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main(argv)
    return rc, [str(w.message) for w in caught]


def _finite(path: Path) -> bool:
    state = load_checkpoint(path)
    return not nonfinite_entries({k: state[k] for k in ("learner", "optimizer")})


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


# ---------------------------------------------------------------------------------------------- 1. divergence
@pytest.mark.parametrize("where", ["bn_running_var", "weight", "optimizer_momentum"])
def test_nonfinite_state_never_overwrites_the_good_checkpoints(
    data: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    out = tmp_path / "run"
    assert _run(_args(data, out, "--max-steps", "2"))[0] == 0
    good = {p: p.read_bytes() for p in (out / "last.pt", out / "last.prev.pt")}

    real_step = train_mod.Trainer._train_step

    def poisoned_step(self, images):  # the state blows up at step 3 while the loss stays finite
        loss = real_step(self, images)
        if self.step == 3:
            with torch.no_grad():
                if where == "bn_running_var":
                    next(m for m in self.learner.net.modules() if isinstance(m, nn.BatchNorm2d)).running_var.fill_(float("inf"))
                elif where == "weight":
                    next(self.learner.net.parameters()).fill_(float("nan"))
                else:
                    buf = next(s["momentum_buffer"] for s in self.optimizer.state.values() if s.get("momentum_buffer") is not None)
                    buf.fill_(float("nan"))
        return loss

    monkeypatch.setattr(train_mod.Trainer, "_train_step", poisoned_step)
    capsys.readouterr()
    rc, _ = _run(_args(data, out, "--max-steps", "6"))
    err = capsys.readouterr().err
    assert rc == EXIT_DIVERGED == 3
    assert "NaN or infinite by step 3" in err and "last good checkpoint (step 2" in err
    assert {p: p.read_bytes() for p in good} == good  # neither checkpoint was touched
    assert _finite(out / "last.pt") and load_checkpoint(out / "last.pt")["step"] == 2
    monkeypatch.undo()
    assert _run(_args(data, out, "--max-steps", "3"))[0] == 0  # the kept state resumes


def test_nonfinite_entries_names_what_is_not_finite() -> None:
    state = {"a": torch.zeros(3), "b": {"c": torch.tensor([1.0, float("nan")]), "n": torch.arange(3)}, "s": [torch.ones(2)]}
    assert nonfinite_entries(state) == ["b.c"]
    state["s"][0][1] = float("-inf")
    assert nonfinite_entries(state) == ["b.c", "s.0"]
    assert nonfinite_entries({"x": torch.ones(2, dtype=torch.bfloat16), "e": torch.empty(0)}) == []


# ---------------------------------------------------------------------------------------------- 2. the lock
def test_second_process_on_the_same_out_refuses_and_sigkill_releases_the_lock(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = _args(data, out, "--log-every", "1")
    first = subprocess.Popen(
        [sys.executable, "-m", "byol_wrapper.train", *argv, "--max-steps", "100000"],
        cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "last.pt").exists():  # the first one is training
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run(
            [sys.executable, "-m", "byol_wrapper.train", *argv, "--max-steps", "100000"],
            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180,
        )
        assert second.returncode == 2, second.stderr
        lines = [ln for ln in second.stderr.splitlines() if ln.startswith("byol-train: error:")]
        assert len(lines) == 1 and f"process {first.pid}" in lines[0] and "another --out" in lines[0], second.stderr
        assert "Traceback" not in second.stderr
        assert first.poll() is None  # the first run is undisturbed
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(timeout=30) == -signal.SIGKILL
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    step = load_checkpoint(out / "last.pt" if (out / "last.pt").exists() else previous_path(out / "last.pt"))["step"]
    rc, _ = _run([*argv, "--max-steps", str(step + 1)])  # no stale lock to remove by hand
    assert rc == 0


def test_run_lock_excludes_and_forked_children_do_not_keep_it(tmp_path: Path) -> None:
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunLockedError, match=f"process {os.getpid()}") as info:
        RunLock(tmp_path).acquire()
    assert info.value.holder["pid"] == os.getpid() and info.value.holder["host"]
    read, write = os.pipe()
    pid = os.fork()  # like a DataLoader worker
    if pid == 0:  # pragma: no cover - child
        os.close(read)
        os.write(write, b"x")
        time.sleep(3)
        os._exit(0)
    try:
        os.close(write)
        assert os.read(read, 1) == b"x"
        first.release()  # the parent is done (or killed) while its child still runs
        RunLock(tmp_path).acquire().release()  # the child does not hold the lock
    finally:
        os.close(read)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


@pytest.mark.distributed
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_torchrun_ranks_refuse_together_when_out_is_locked(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):  # another run holds --out: rank 0 is refused and rank 1 must follow, not hang
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "byol_wrapper.train", *_args(data, out, "--max-steps", "1")]  # fmt: skip
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode != 0
    errors = [ln for ln in proc.stderr.splitlines() if "byol-train: error:" in ln]
    assert len(errors) == 1 and f"process {os.getpid()}" in errors[0], proc.stderr  # rank 0 speaks, once
    # Rank 0 stops with status 2 (torchrun prints its own report of the failed children, no rank traceback). Rank 1
    # leaves with status 2 too, unless torchrun's agent, seeing rank 0 fail first, already terminated it (a race).
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)
    assert "2" in codes and set(codes) <= {"2", "-15"}, proc.stderr
    assert "byol_wrapper/train.py" not in proc.stderr, proc.stderr
    assert not (out / "last.pt").exists()


# ---------------------------------------------------------------------------------------------- 3.-5. checkpoint files
@pytest.mark.parametrize(
    "fault",
    [
        PermissionError(errno.EACCES, "Permission denied"),
        OSError(errno.EIO, "Input/output error"),
        "open",
    ],
    ids=["torch.load-EACCES", "torch.load-EIO", "open-EACCES"],
)
def test_unreadable_checkpoint_stops_and_touches_nothing(
    data: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, fault: object
) -> None:
    out = tmp_path / "run"
    assert _run(_args(data, out, "--max-steps", "2"))[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    if fault == "open":
        real_open = builtins.open

        def fake_open(file, *a, **k):
            if Path(str(file)).name in ("last.pt", "last.prev.pt"):
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *a, **k)

        monkeypatch.setattr(ckpt_mod, "open", fake_open, raising=False)
    else:

        def fake_load(*a, **k):
            raise fault

        monkeypatch.setattr(ckpt_mod.torch, "load", fake_load)
    capsys.readouterr()
    rc, _ = _run(_args(data, out, "--max-steps", "4"))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("byol-train: error:") and "cannot be read" in err and "nothing was changed" in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.name != ".byol-train.lock"}
    before.pop(".byol-train.lock", None)
    assert after == before  # nothing renamed, nothing trained, the log kept


def test_a_set_aside_file_never_replaces_another(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    contents = []
    for i in range(3):
        path.write_bytes(f"garbage {i}".encode())
        contents.append(path.read_bytes())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert load_latest_checkpoint(path) == (None, None)
    aside = sorted(tmp_path.glob("last.pt.corrupt*"))
    assert [p.name for p in aside] == ["last.pt.corrupt", "last.pt.corrupt.1", "last.pt.corrupt.2"]
    assert sorted(p.read_bytes() for p in aside) == sorted(contents)


@pytest.mark.parametrize("kind", ["state_dict", "pickled_model"])
def test_a_file_that_is_not_our_checkpoint_is_refused(data: Path, tmp_path: Path, capsys, kind: str) -> None:
    out = tmp_path / "run"
    out.mkdir()
    net = nn.Linear(2, 2)
    torch.save(net.state_dict() if kind == "state_dict" else net, out / "last.pt")
    original = (out / "last.pt").read_bytes()
    rc, _ = _run(_args(data, out, "--max-steps", "2"))
    err = capsys.readouterr().err
    assert rc == 2 and "is not" in err and "byol_wrapper checkpoint" in err and "will not train over it" in err
    assert (out / "last.pt").read_bytes() == original and not list(out.glob("*.corrupt*"))
    assert not (out / "metrics.jsonl").exists()


def test_both_checkpoints_corrupt_keeps_the_old_history(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _run(_args(data, out, "--max-steps", "3"))[0] == 0
    history = (out / "metrics.jsonl").read_text()
    (out / "last.pt").write_bytes(b"torn")
    (out / "last.prev.pt").write_bytes(b"")
    rc, messages = _run(_args(data, out, "--max-steps", "2"))
    assert rc == 0
    assert (out / "metrics.jsonl.old").read_text() == history  # set aside, not deleted
    assert (out / "last.pt.corrupt").exists() and (out / "last.prev.pt.corrupt").exists()
    assert any("metrics.jsonl.old" in m for m in messages)
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] == 2


# ---------------------------------------------------------------------------------------------- 6.-9. data
def test_symlink_loops_are_followed_once(tmp_path: Path) -> None:
    root = _write_images(tmp_path / "data", per_class=2)
    (root / "class0" / "loop").symlink_to(root, target_is_directory=True)  # a cycle back to the root
    (root / "class1" / "self").symlink_to(root / "class1", target_is_directory=True)
    (root / "alias").symlink_to(root / "class0", target_is_directory=True)  # a second link to a real folder
    start = time.monotonic()
    files = find_images(root)
    assert time.monotonic() - start < 10
    assert len(files) == 4 and len({f.resolve() for f in files}) == 4


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_non_regular_files_are_skipped_and_counted(tmp_path: Path) -> None:
    root = _write_images(tmp_path / "data", per_class=2)
    os.mkfifo(root / "class0" / "pipe.jpg")
    with pytest.warns(RuntimeWarning, match=r"skipped 1 entry.*pipe\.jpg.*not a regular file"):
        ds = ImageFolderDataset(root, 16)
    assert len(ds) == 4 and all(f.name != "pipe.jpg" for f in ds.files)
    assert [p.name for p, _ in ds.scan_skipped] == ["pipe.jpg"]
    assert all(ds[i] is not None for i in range(len(ds)))  # nothing left that blocks the decoder


def test_unlistable_subfolder_warns_and_is_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _write_images(tmp_path / "data", per_class=2)
    (root / "class1" / "deep").mkdir()
    real_scandir = os.scandir

    def fake_scandir(path=".", *a, **k):  # chmod does not stop root (CI): fail the listing instead
        if Path(os.fsdecode(path)).name == "deep":
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_scandir(path, *a, **k)

    monkeypatch.setattr(os, "scandir", fake_scandir)
    with pytest.warns(RuntimeWarning, match=r"skipped 1 entry.*deep.*cannot be listed"):
        ds = ImageFolderDataset(root, 16)
    assert len(ds) == 4 and len(ds.scan_skipped) == 1


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((16, 32, 3), np.uint8)  # stored 32 wide, 16 high: left half red, right half blue
    arr[:, :16, 0] = 255
    arr[:, 16:, 2] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": upright it is 16 wide, red on top
    (tmp_path / "d").mkdir()
    img.save(tmp_path / "d" / "phone.jpg", exif=exif.tobytes(), quality=95)
    x = ImageFolderDataset(tmp_path / "d", 16)[0][0].float()  # (3, 16, 16), centre crop of the upright image
    top, bottom = x[:, :4].mean(dim=(1, 2)), x[:, -4:].mean(dim=(1, 2))
    assert top[0] > 200 and top[2] < 60  # red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue below


# ---------------------------------------------------------------------------------------------- 10. threads
class _SlowAfterHook(nn.Module):
    """A backbone whose hooked layer is followed by a GIL-releasing pause, so threads interleave."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.body(x))
        time.sleep(0.002)
        return self.fc(y.flatten(1))


def test_concurrent_forwards_never_return_another_calls_features() -> None:
    learner = BYOL(_SlowAfterHook(), 8, hidden_layer="pool", projection_size=8, projection_hidden_size=16).eval()
    inputs = [torch.rand(2, 3, 8, 8) for _ in range(8)]
    with torch.no_grad():
        expected = [learner(x, return_embedding=True, return_projection=False) for x in inputs]
    wrong: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(len(inputs))

    def work(i: int) -> None:
        try:
            start.wait()
            with torch.no_grad():
                for _ in range(15):
                    got = learner(inputs[i], return_embedding=True, return_projection=False)
                    if not torch.allclose(got, expected[i]):
                        wrong.append(i)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors[0]
    assert not wrong, f"{len(wrong)} of {15 * len(inputs)} embeddings came from another thread's call"
    assert not learner.online_encoder._hook.store  # every entry was consumed


# ---------------------------------------------------------------------------------------------- 11. clear errors
def test_out_that_is_a_file_exits_2(data: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(_args(data, out, "--max-steps", "1")) == 2
        err = capsys.readouterr().err
        assert err.startswith("byol-train: error:") and "is a file, not a folder" in err and err.count("\n") == 1


def test_read_only_out_exits_2(data: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "ro"
    real_mkdir, real_open = os.mkdir, os.open

    def ro(real):
        def fake(path, *a, **k):
            if os.fsdecode(path).startswith(str(out)):
                raise OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))
            return real(path, *a, **k)

        return fake

    monkeypatch.setattr(os, "mkdir", ro(real_mkdir))
    monkeypatch.setattr(os, "open", ro(real_open))
    assert main(_args(data, out, "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("byol-train: error:") and "Read-only file system" in err and "writable" in err
    assert err.count("\n") == 1


def test_full_disk_at_a_checkpoint_exits_2_and_keeps_the_last(
    data: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    assert _run(_args(data, out, "--max-steps", "2"))[0] == 0
    good = (out / "last.pt").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt_mod.torch, "save", full)
    capsys.readouterr()
    rc, _ = _run(_args(data, out, "--max-steps", "4"))
    err = capsys.readouterr().err
    assert rc == 2 and "No space left on device" in err and "free some space" in err and "still holds step 2" in err
    assert "Traceback" not in err
    assert (out / "last.pt").read_bytes() == good and not list(out.glob(".tmp-*"))


@pytest.mark.parametrize(
    ("device", "message"),
    [("meta", "--device meta holds no data"), ("mps", "MPS (Apple GPU) is not available")],
)
def test_unusable_devices_exit_2(data: Path, tmp_path: Path, capsys, device: str, message: str) -> None:
    if device == "mps" and torch.backends.mps.is_available():  # pragma: no cover
        pytest.skip("this machine has MPS")
    argv = _args(data, tmp_path / "out", "--max-steps", "1")
    argv[argv.index("--device") + 1] = device
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("byol-train: error:") and message in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------- 12. bfloat16
@pytest.mark.parametrize("how", ["net_then_wrap", "wrap_then_cast"])
def test_bfloat16_backbone_on_the_cpu_trains_and_embeds(how: str) -> None:
    from tests.conftest import TinyCNN

    net = TinyCNN()
    kwargs = dict(hidden_layer="pool", projection_size=8, projection_hidden_size=16)
    learner = BYOL(net.to(torch.bfloat16), 16, **kwargs) if how == "net_then_wrap" else BYOL(net, 16, **kwargs).to(torch.bfloat16)
    loss = learner(torch.rand(4, 3, 16, 16))
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert next(learner.net.parameters()).grad is not None
    learner.update_moving_average()
    learner.eval()
    emb = learner(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8), return_embedding=True, return_projection=False)
    assert emb.shape == (2, 16) and emb.dtype == torch.bfloat16
