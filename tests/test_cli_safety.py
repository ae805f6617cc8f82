"""Data safety of ``dynaguide segment``: OUT == IN, collisions, files dynaguide did not write,
resume verification, kill -9 at random points then ``--resume``, concurrent runs, read-only
and full output folders. Every good input must end with exactly one complete, consistent
output set, and no user file may be touched."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import dynaguide
from dynaguide import cli
from dynaguide.output_sets import PlannedImage, settings_fingerprint, verify_output_set
from dynaguide.segmentation import Segmentation, _version
from dynaguide.writing import is_temporary_name, remove_stale_temporaries, write_atomic

HERE = Path(__file__).resolve().parent
QUICK = ["--max-iter", "2", "--guidance", "none", "--quiet"]


def _image(path: Path, seed: int = 0, size: tuple[int, int] = (10, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _fake(calls: list[str]):
    def segment(image: Any, **kwargs: Any) -> Segmentation:
        calls.append(kwargs["name"])
        labels = (image[:, :, 0] > 127).astype(np.int32)
        return Segmentation(
            labels=labels - labels.min(), n_labels=int(labels.max() - labels.min()) + 1,
            n_iter=1, history={"loss": [1.0], "n_labels": [1]}, guide_labels=None, image=image,
            config={"max_iter": kwargs.get("max_iter")}, seconds=0.0, stop_reason="fake",
            name=kwargs["name"],
        )  # fmt: skip

    return segment


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    recorded: list[str] = []
    monkeypatch.setattr(dynaguide, "segment", _fake(recorded), raising=False)
    return recorded


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and ".dynaguide" not in p.parts
    }


def _sets(out: Path) -> dict[str, set[str]]:
    """Output files per stem (without dynaguide's bookkeeping folder)."""
    found: dict[str, set[str]] = {}
    for p in out.iterdir():
        for suffix in (".labels.png", ".overlay.png", ".json"):
            if p.name.endswith(suffix):
                found.setdefault(p.name[: -len(suffix)], set()).add(suffix)
    return found


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _fingerprint_of(json_path: Path) -> str:
    return json.loads(json_path.read_text())["run"]["fingerprint"]


def _complete(src: Path, out: Path, stem: str, fingerprint: str | None = None) -> bool:
    item = PlannedImage(src, out, stem)
    fp = fingerprint or _fingerprint_of(item.outputs["json"])
    return verify_output_set(item, fingerprint=fp, version=_version()) is None


# --------------------------------------------------------------------------- OUT vs IN


@pytest.mark.parametrize("out_of", [lambda s: s, lambda s: s / ".", lambda s: s / "sub" / "deep"])
def test_out_is_in_or_inside_in_is_refused(tmp_path, calls, capsys, out_of) -> None:
    src = tmp_path / "in"
    _image(src / "a.png")
    (src / "c.json").write_text("user data")
    before = _hashes(src)
    rc, _, err = _run(["segment", str(src), str(out_of(src)), "--quiet"], capsys)
    assert rc == 2 and "OUT" in err and calls == []
    assert _hashes(src) == before and not (src / "sub").exists()


def test_outputs_of_an_earlier_run_are_never_inputs(tmp_path, calls, capsys) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _image(src / "a.png")
    assert _run(["segment", str(src), str(out), "--quiet"], capsys)[0] == 0
    rc, _, err = _run(["segment", str(out), str(tmp_path / "out2"), "--quiet"], capsys)
    assert rc == 2 and "no image files" in err and "dynaguide wrote itself" in err
    _image(out / "user.png", 3)  # a user image among the outputs is still an input
    assert _run(["segment", str(out), str(tmp_path / "out2"), "--quiet"], capsys)[0] == 0
    assert calls[-1] == str(out / "user.png") and len(calls) == 2
    # a file replaced by the user is no longer dynaguide's: it is read again
    _image(out / "a.overlay.png", 4)
    assert _run(["segment", str(out), str(tmp_path / "out3"), "--quiet"], capsys)[0] == 0
    assert str(out / "a.overlay.png") in calls


def test_in_inside_out_recursive_never_reads_its_own_outputs(tmp_path, calls, capsys) -> None:
    out = tmp_path / "out"
    src = out / "photos"
    _image(src / "x.png")
    _image(src / "photos" / "y.png", 1)  # its outputs go to out/photos/: inside IN
    before = _hashes(src)
    assert _run(["segment", str(src), str(out), "--recursive", "--quiet"], capsys)[0] == 0
    assert (src / "y.labels.png").is_file() and (src / "y.overlay.png").is_file()
    after = _hashes(src)
    assert {k: after[k] for k in before} == before
    assert _run(["segment", str(src), str(out), "--recursive", "--quiet"], capsys)[0] == 0
    assert sorted(calls) == sorted([str(src / "x.png"), str(src / "photos" / "y.png")] * 2)


# --------------------------------------------------------------------------- names


def test_collisions_keep_extensions_or_fail_before_any_work(tmp_path, calls, capsys) -> None:
    src = tmp_path / "in"
    for i, name in enumerate(("a.png", "a.jpg", "a.png.jpg", "b.png")):
        _image(src / name, i)
    out = tmp_path / "out"
    rc, text, _ = _run(["segment", str(src), str(out), "--quiet"], capsys)
    assert rc == 0 and "4 segmented" in text
    assert _sets(out) == {s: {".labels.png", ".overlay.png", ".json"}
                          for s in ("a.png", "a.jpg", "a.png.jpg", "b")}  # fmt: skip
    for stem, name in (("a.png", "a.png"), ("a.jpg", "a.jpg"), ("a.png.jpg", "a.png.jpg")):
        assert json.loads((out / f"{stem}.json").read_text())["name"] == str(src / name)
    _image(src / "A.PNG", 9)  # a.png and A.PNG: the same files on a case-insensitive disk
    n = len(calls)
    rc, _, err = _run(["segment", str(src), str(tmp_path / "out2"), "--quiet"], capsys)
    assert rc == 2 and "A.PNG" in err and "a.png" in err and len(calls) == n
    assert not (tmp_path / "out2").exists()


def test_names_are_stable_and_long_names_fit(tmp_path, calls, capsys) -> None:
    src = tmp_path / "in"
    long = "L" * 240 + ".png"
    _image(src / long)
    _image(src / "b.png", 1)
    out = tmp_path / "out"
    assert _run(["segment", str(src), str(out), "--quiet"], capsys)[0] == 0
    first = sorted(_sets(out))
    assert len(first) == 2 and all(len(s.encode()) <= 211 for s in first)
    assert _run(["segment", str(src), str(out), "--resume", "--quiet"], capsys)[0] == 0
    assert sorted(_sets(out)) == first and len(calls) == 2  # same names, nothing redone


# --------------------------------------------------------------------------- user files


def test_files_dynaguide_did_not_write_are_never_overwritten(tmp_path, calls, capsys) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _image(src / "a.png")
    _image(src / "b.png", 1)
    out.mkdir()
    (out / "a.json").write_text('{"mine": 1}')
    (out / "notes.txt").write_text("keep")
    rc, text, err = _run(["segment", str(src), str(out), "--quiet"], capsys)
    assert rc == 1 and "1 segmented" in text and "a.json" in err and "did not write" in err
    assert (out / "a.json").read_text() == '{"mine": 1}' and calls == [str(src / "b.png")]
    assert not (out / "a.labels.png").exists()  # refused before writing anything of a's set
    (out / "b.labels.png").write_bytes(b"edited by the user")
    rc, _, err = _run(["segment", str(src), str(out), "--quiet"], capsys)
    assert (
        rc == 1
        and "b.labels.png" in err
        and (out / "b.labels.png").read_bytes() == b"edited by the user"
    )
    assert (out / "notes.txt").read_text() == "keep"


# --------------------------------------------------------------------------- resume


def test_resume_verifies_each_output_set(tmp_path, calls, capsys) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    for i, name in enumerate("abcdef"):
        _image(src / f"{name}.png", i)
    assert _run(["segment", str(src), str(out), "--max-iter", "3", "--quiet"], capsys)[0] == 0
    assert len(calls) == 6
    (out / "a.labels.png").write_bytes(b"")  # empty: must not pass as done
    (out / "b.json").unlink()  # incomplete set
    data = json.loads((out / "c.json").read_text())
    data["run"]["dynaguide_version"] = "0.0.1"  # another version
    write_atomic(out / "c.json", json.dumps(data).encode())  # (not recorded as dynaguide's)
    os.utime(src / "d.png", ns=(1, 1))  # the input changed
    (out / "e.overlay.png").unlink()  # a file missing
    rc, text, err = _run(
        ["segment", str(src), str(out), "--max-iter", "3", "--resume", "--quiet"], capsys
    )
    # a's emptied label file and c's rewritten JSON are no longer dynaguide's: refused, not lost
    assert rc == 1 and "a.labels.png" in err and "c.json" in err
    assert "3 segmented, 1 skipped (resume), 2 failed" in text
    assert sorted(calls[6:]) == [str(src / f"{n}.png") for n in "bde"]
    (out / "a.labels.png").unlink()
    (out / "c.json").unlink()
    rc, text, _ = _run(
        ["segment", str(src), str(out), "--max-iter", "3", "--resume", "--quiet"], capsys
    )
    assert rc == 0 and "2 segmented, 4 skipped (resume)" in text
    rc, text, _ = _run(
        ["segment", str(src), str(out), "--max-iter", "4", "--resume", "--quiet"], capsys
    )
    assert rc == 0 and "6 segmented, 0 skipped" in text  # other settings: every set redone
    fp = _fingerprint_of(out / "a.json")
    assert all(_complete(src / f"{n}.png", out, n, fp) for n in "abcdef")


def test_stale_temporaries_are_removed_only_when_dynaguide_owns_them(tmp_path) -> None:
    import fcntl

    folder = tmp_path / "out"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    stale = folder / f".dynaguide-{dead}-0123abcd.a.json.tmp"
    stale.write_bytes(b"half")
    mine = folder / f".dynaguide-{os.getpid()}-89abcdef.b.json.tmp"
    mine.write_bytes(b"being written")
    fd = os.open(mine, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a live writer holds its lock
    user = [folder / ".a.json.x1y2z3.tmp", folder / ".dynaguide-notes.tmp", folder / "a.tmp"]
    for p in user:
        p.write_text("user")
    try:
        assert remove_stale_temporaries(folder) == [stale]
    finally:
        os.close(fd)
    assert mine.exists() and all(p.read_text() == "user" for p in user)
    assert is_temporary_name(stale.name) and not any(is_temporary_name(p.name) for p in user)


# --------------------------------------------------------------------------- crashes and races


def _driver(spec: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "cli_kill_driver.py"), json.dumps(spec)],
                          capture_output=True, text=True, timeout=240, env=env, cwd=HERE.parent.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kill_9_at_random_points_then_resume(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    for i, name in enumerate("abc"):
        _image(src / f"{name}.png", i, size=(6, 8))
    (src / "d.png").write_bytes(b"\x89PNG corrupt")
    for folder in (out, tmp_path / "count"):  # the count run sees the same user files
        folder.mkdir()
        (folder / "c.json").write_text("the user's c.json")
        (folder / "notes.txt").write_text("keep me")
    before_in, before_out = _hashes(src), _hashes(out)
    argv = ["segment", str(src), str(out), *QUICK, "--resume"]
    count = ["segment", str(src), str(tmp_path / "count"), *QUICK]
    rec = _driver({"mode": "kill", "argv": argv, "count_argv": count, "seed": 11, "rounds": 12})
    assert all(rec["killed"][0::2]), rec  # every full run was killed mid-way
    assert rec["final"] == 1, rec["final_output"]  # c (user's c.json) and d (corrupt) fail
    assert _hashes(src) == before_in
    after = _hashes(out)
    assert {k: after[k] for k in before_out} == before_out  # user files untouched
    assert _sets(out) == {"a": {".labels.png", ".overlay.png", ".json"},
                          "b": {".labels.png", ".overlay.png", ".json"}, "c": {".json"}}  # fmt: skip
    fp = _fingerprint_of(out / "a.json")
    assert _complete(src / "a.png", out, "a", fp) and _complete(src / "b.png", out, "b", fp)
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_concurrent_runs_share_the_work(tmp_path: Path) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    names = [f"im{i}" for i in range(6)]
    for i, name in enumerate(names):
        _image(src / f"{name}.png", i, size=(6, 8))
    argv = ["segment", str(src), str(out), *QUICK, "--resume"]
    other = ["segment", str(src), str(out), "--max-iter", "3", "--guidance", "none", "--quiet"]
    same, mixed = _driver({"mode": "concurrent", "groups": [[argv, argv], [other, argv[:-1]]]})
    assert same["rcs"] == [0, 0], same
    done = [int(text.split(" segmented")[0].split()[-1]) for text in same["outputs"]]
    assert sum(done) == len(names), same["outputs"]  # each image refined exactly once
    # the second group: two runs with other settings, no resume, both over every image
    assert mixed["rcs"] == [0, 0], mixed
    assert all(_complete(src / f"{n}.png", out, n) for n in names)  # each set from one run
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


# --------------------------------------------------------------------------- unwritable OUT


def test_read_only_out_is_found_before_any_refinement(tmp_path, calls, capsys, monkeypatch) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    _image(src / "a.png")
    out.mkdir()
    real_open = os.open

    def refuse(path, flags, *args, **kwargs):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    rc, _, err = _run(["segment", str(src), str(out), "--quiet"], capsys)
    assert rc == 2 and "not writable" in err and str(out) in err and calls == []
    monkeypatch.setattr(os, "open", real_open)
    if os.geteuid() != 0:  # root ignores permission bits
        out.chmod(0o555)
        try:
            rc, _, err = _run(["segment", str(src), str(out), "--quiet"], capsys)
            assert rc == 2 and "not writable" in err and calls == []
        finally:
            out.chmod(0o755)


def test_full_out_stops_the_run_and_resume_completes(tmp_path, calls, capsys, monkeypatch) -> None:
    src, out = tmp_path / "in", tmp_path / "out"
    for i, name in enumerate("abcd"):
        _image(src / f"{name}.png", i)
    real_fsync = os.fsync
    budget = {"left": 12}  # fsyncs before the disk is "full" (the start-up probe uses one)

    def fsync(fd: int) -> None:
        budget["left"] -= 1
        if budget["left"] < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    rc, _, err = _run(["segment", str(src), str(out), "--quiet"], capsys)
    assert rc == 1 and "stopped" in err and "No space left" in err
    n_done = int(err.split(" segmented")[0].split()[-1])
    assert 0 < len(calls) < 4 and [p for p in out.iterdir() if p.name.endswith(".tmp")] == []
    monkeypatch.setattr(os, "fsync", real_fsync)
    rc, text, _ = _run(["segment", str(src), str(out), "--quiet", "--resume"], capsys)
    assert rc == 0 and f"{n_done} skipped (resume)" in text
    fp = _fingerprint_of(out / "a.json")
    assert all(_complete(src / f"{n}.png", out, n, fp) for n in "abcd")
    assert settings_fingerprint({"x": 1}) != settings_fingerprint({"x": 2})
