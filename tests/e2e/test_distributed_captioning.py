"""The captioning job on a local Ray instance with two replicas of the demo model: every path
gets exactly one row, the captions are right, duplicates are captioned once, bad files get their
error rows, and the job survives an interruption and a replica that dies."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the distributed path needs the ray extra")
pytest.importorskip("ray.data", reason="the distributed path needs ray[data]")

from vlm_engine.captioning import caption_sources  # noqa: E402
from vlm_engine.demo.evaluation import held_out_examples, score_captions  # noqa: E402
from vlm_engine.distributed import caption_dataset  # noqa: E402

NUM_PICTURES = 40


@pytest.fixture(scope="module")
def cluster():
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """40 demo pictures, 8 of them again under other names, and 3 bad files; the scenes by
    path (None for the bad ones)."""
    root = tmp_path_factory.mktemp("pictures")
    scenes = {}
    for i, (image, scene) in enumerate(held_out_examples(NUM_PICTURES, seed=7)):
        path = root / f"picture{i:02d}.png"
        image.save(path)
        scenes[str(path)] = scene
    for i in range(8):
        copy = root / f"again{i}.png"
        shutil.copy(root / f"picture{i * 3:02d}.png", copy)
        scenes[str(copy)] = scenes[str(root / f"picture{i * 3:02d}.png")]
    (root / "notes.png").write_bytes(b"a text file, not a picture")
    (root / "truncated.png").write_bytes((root / "picture01.png").read_bytes()[:200])
    (root / "empty.png").write_bytes(b"")
    for name in ("notes.png", "truncated.png", "empty.png"):
        scenes[str(root / name)] = None
    return root, scenes


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def check_rows(rows: list[dict], scenes: dict, bad_files: bool = True) -> None:
    """One row per path; right captions for at least 90% of the pictures; errors for the bad."""
    assert sorted(r["path"] for r in rows) == sorted(scenes)
    good = [r for r in rows if scenes[r["path"]] is not None]
    assert all(r["error"] is None for r in good)
    score = score_captions([scenes[r["path"]] for r in good], [r["caption"] for r in good])
    assert score.all_correct / len(good) >= 0.9, score
    bad = {Path(r["path"]).name: r["error"] for r in rows if scenes[r["path"]] is None}
    if not bad_files:
        return
    assert bad["notes.png"].startswith("NotAnImageError")
    assert bad["truncated.png"].startswith("CorruptImageError")
    assert bad["empty.png"].startswith("EmptyImageError")


def test_every_path_once_duplicates_captioned_once(cluster, pictures, tmp_path):
    root, scenes = pictures
    output = tmp_path / "captions.jsonl"
    summary = caption_dataset([root], output, replicas=2)
    rows = read_rows(output)
    check_rows(rows, scenes)
    assert summary.num_duplicates == 8 and summary.num_errors == 3
    assert summary.num_captioned == NUM_PICTURES + 8
    # the engines took each distinct decodable picture once (bad files are rejected unqueued)
    assert summary.num_engine_requests == NUM_PICTURES
    assert summary.num_images_encoded == NUM_PICTURES  # the vision tower ran once per picture
    # one share per replica that took a request (both, unless one got every batch)
    assert 1 <= len(summary.replica_idle_shares) <= 2
    assert all(0 <= share <= 1 for share in summary.replica_idle_shares)
    local = tmp_path / "local.jsonl"
    caption_sources([root], local)
    assert {r["path"]: r["error"] for r in read_rows(local)} == {
        r["path"]: r["error"] for r in rows
    }
    again = caption_dataset([root], output, replicas=2)
    assert again.num_skipped == len(scenes) and again.num_captioned == 0
    assert len(read_rows(output)) == len(scenes)


def test_replicas_share_image_encodings_through_a_connector(cluster, pictures, tmp_path):
    """Two jobs over the same pictures with one disk connector shared by all replicas: the
    second job's replicas (new engines, empty encoder caches) load every encoding instead of
    running the vision tower."""
    root, scenes = pictures
    options = {"ec_connector": f"disk:{tmp_path / 'encodings'}"}
    first = caption_dataset([root], tmp_path / "first.jsonl", replicas=2, engine_options=options)
    assert first.num_images_encoded == NUM_PICTURES
    second = caption_dataset([root], tmp_path / "second.jsonl", replicas=2, engine_options=options)
    assert second.num_images_encoded == 0
    check_rows(read_rows(tmp_path / "second.jsonl"), scenes)


def test_a_dataset_of_bytes_returns_rows(cluster, pictures):
    root, scenes = pictures
    names = sorted(p for p in scenes if scenes[p] is not None)[:6]
    items = [{"path": Path(p).name, "bytes": Path(p).read_bytes()} for p in names]
    rows = caption_dataset(ray.data.from_items(items), replicas=1)
    assert sorted(r["path"] for r in rows) == sorted(Path(p).name for p in names)
    by_name = {Path(p).name: scenes[p] for p in names}
    score = score_captions([by_name[r["path"]] for r in rows], [r["caption"] for r in rows])
    assert score.all_correct >= 5


JOB = """
import sys
from vlm_engine import SamplingParams
from vlm_engine.distributed import caption_dataset
# Long captions (the demo model's stop token ignored), so that the job is still running when
# the test interrupts it.
params = SamplingParams(temperature=0, max_tokens=300, ignore_eos=True)
caption_dataset([sys.argv[1]], sys.argv[2], address=sys.argv[3], replicas=2, batch_size=2, params=params)
"""


def test_an_interrupted_job_resumes_without_gaps_or_repeats(cluster, pictures, tmp_path):
    root, scenes = pictures
    output, script = tmp_path / "captions.jsonl", tmp_path / "job.py"
    script.write_text(JOB)
    command = [sys.executable, str(script), str(root), str(output), cluster]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not output.exists() or len(output.read_text().splitlines()) < 4:
        assert job.poll() is None, job.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    job.send_signal(signal.SIGINT)  # Ctrl-C
    job.wait(120)
    written = read_rows(output)
    assert 4 <= len(written) < len(scenes)  # stopped midway
    assert len({r["path"] for r in written}) == len(written)
    summary = caption_dataset([root], output, replicas=2)
    assert summary.num_skipped == len(written)
    rows = read_rows(output)
    assert sorted(r["path"] for r in rows) == sorted(scenes)
    rerun = {r["path"]: r for r in rows[len(written) :]}
    check_rows([*rerun.values()], {p: scenes[p] for p in rerun}, bad_files=False)


def replica_pids() -> list[int]:
    ps = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in ps.splitlines() if "CaptionReplica" in line]


def test_a_replica_that_dies_midway(cluster, pictures, tmp_path):
    root, scenes = pictures
    output = tmp_path / "captions.jsonl"
    killed = []

    def kill_one(rows: list[dict]) -> None:
        if not killed and len(read_rows(output)) >= 12:
            pids = replica_pids()
            assert pids
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    caption_dataset([root], output, replicas=2, batch_size=4, on_rows=kill_one)
    assert killed
    check_rows(read_rows(output), scenes)


def test_the_command_line_runs_the_job_on_the_cluster(cluster, pictures, tmp_path):
    root, scenes = pictures
    listing = tmp_path / "some.txt"
    chosen = sorted(p for p in scenes if scenes[p] is not None)[:5]
    listing.write_text("\n".join(chosen) + "\n")
    output = tmp_path / "captions.csv"
    command = [
        sys.executable, "-m", "vlm_engine.cli", "caption", str(listing), "-o", str(output),
        "--ray", cluster, "--replicas", "1",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "captioned 5 images" in run.stdout
    lines = output.read_text().splitlines()
    assert lines[0] == "path,caption,error" and len(lines) == 6
