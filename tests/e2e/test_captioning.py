"""Batch captioning with the built-in demo model: folders, globs and list files to JSONL or CSV,
bad images reported in their rows, resuming, and `vlm-engine caption` as a user runs it."""

from __future__ import annotations

import csv
import json
import random
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_engine import Engine, SamplingParams
from vlm_engine.caption_file import CaptionFile, CaptionFileError
from vlm_engine.captioning import DEFAULT_MAX_TOKENS, caption_images, find_images
from vlm_engine.cli import main
from vlm_engine.demo import (
    DEMO_JSON_MAX_TOKENS,
    DEMO_JSON_PROMPT,
    default_model_path,
    demo_request,
    demo_schema,
)
from vlm_engine.demo.shapes import KINDS, ShapeScene, make_example, parse_caption, scene_json

REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(temperature=0, max_tokens=DEFAULT_MAX_TOKENS)


@pytest.fixture(scope="module")
def engine():
    with Engine(default_model_path()) as engine:
        yield engine


def draw_pictures(folder: Path, seeds) -> dict[Path, ShapeScene]:
    """One picture of shapes per seed, saved as shape_SEED.png; path -> the scene it shows."""
    folder.mkdir(parents=True, exist_ok=True)
    scenes = {}
    for seed in seeds:
        image, scene = make_example(random.Random(seed), size=128)
        path = folder / f"shape_{seed:02d}.png"
        image.save(path)
        scenes[path] = scene
    return scenes


def direct_captions(engine: Engine, paths, params: SamplingParams = GREEDY) -> list[str]:
    return [out.text for out in engine.generate([demo_request(str(p)) for p in paths], params)]


def read_rows(path: Path) -> dict[str, dict]:
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return {row["path"]: row for row in csv.DictReader(f)}
    return {row["path"]: row for row in map(json.loads, path.read_text().splitlines())}


def counts(summary) -> tuple[int, int, int]:
    return summary.num_captioned, summary.num_skipped, summary.num_errors


def num_requests(engine: Engine) -> int:
    requests = engine.stats()["requests"]
    return requests["requests"] + requests["rejected"]


def test_folder_to_jsonl_with_bad_images(engine, tmp_path):
    images = tmp_path / "images"
    scenes = draw_pictures(images, range(5))
    (images / "broken.png").write_bytes((images / "shape_00.png").read_bytes()[:300])
    (images / "notes.png").write_text("not an image")
    (images / "readme.txt").write_text("not an image suffix: left out of a folder's images")
    out = tmp_path / "captions.jsonl"

    summary = caption_images(engine, find_images([images]), out, batch_size=3)

    assert counts(summary) == (5, 0, 2)
    assert summary.elapsed_s > 0 and summary.images_per_second > 0
    assert "captioned 5 images, skipped 0 already done, 2 errors" in str(summary)
    rows = read_rows(out)
    assert list(rows) == sorted(str(p) for p in images.glob("*.png"))
    expected = direct_captions(engine, scenes)
    for (path, scene), text in zip(scenes.items(), expected, strict=True):
        assert rows[str(path)] == {"path": str(path), "caption": text, "error": None}
        assert all(parse_caption(text).matches(scene).values()), (text, scene)
    broken, notes = rows[str(images / "broken.png")], rows[str(images / "notes.png")]
    assert broken["caption"] is None
    assert broken["error"].startswith("CorruptImageError: image 0: corrupt or truncated image")
    assert notes["caption"] is None and notes["error"].startswith("NotAnImageError: ")
    assert "broken.png" in broken["error"] and "notes.png" in notes["error"]


def test_resume_captions_only_new_images(engine, tmp_path):
    images, out = tmp_path / "images", tmp_path / "captions.jsonl"
    draw_pictures(images, range(3))
    assert counts(caption_images(engine, find_images([images]), out)) == (3, 0, 0)
    first_run = out.read_bytes()

    before = num_requests(engine)
    again = caption_images(engine, find_images([images]), out)
    assert counts(again) == (0, 3, 0)
    assert num_requests(engine) == before  # nothing reached the engine
    assert out.read_bytes() == first_run

    new = draw_pictures(images, range(3, 5))
    assert counts(caption_images(engine, find_images([images]), out)) == (2, 3, 0)
    assert out.read_bytes().startswith(first_run)
    rows = read_rows(out)
    assert len(rows) == 5 and len(out.read_text().splitlines()) == 5
    assert [rows[str(p)]["caption"] for p in new] == direct_captions(engine, new)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_row_cut_off_by_an_interrupted_run_is_redone(engine, tmp_path, suffix):
    images, out = tmp_path / "images", tmp_path / f"captions{suffix}"
    draw_pictures(images, range(3))
    caption_images(engine, find_images([images]), out)
    complete = out.read_bytes()
    out.write_bytes(complete[:-15])  # the last row stops mid-caption, no newline

    assert counts(caption_images(engine, find_images([images]), out)) == (1, 2, 0)
    assert out.read_bytes() == complete  # the cut row was dropped, then written again whole


def test_csv_row_cut_inside_a_multiline_caption(tmp_path):
    out = tmp_path / "captions.csv"
    rows = [
        {"path": "a.png", "caption": "one line", "error": None},
        {"path": "b.png", "caption": "line one\nline two", "error": None},
    ]
    CaptionFile(out).append(rows)
    assert CaptionFile(out).done == {"a.png", "b.png"}
    text = out.read_text()
    out.write_text(text[: text.index("line two")])  # ends in a newline, inside the quotes
    assert CaptionFile(out).done == {"a.png"}
    assert out.read_text() == "path,caption,error\na.png,one line,\n"


def test_files_that_are_not_caption_files_are_refused(tmp_path):
    jsonl, table = tmp_path / "x.jsonl", tmp_path / "x.csv"
    jsonl.write_text('not json\n{"path": "a.png", "caption": "a", "error": null}\n')
    table.write_text("name,size\na.png,3\n")
    for path in (jsonl, table):
        with pytest.raises(CaptionFileError, match="not a"):
            CaptionFile(path)
    assert jsonl.read_text().startswith("not json")  # left as it was
    with pytest.raises(CaptionFileError, match="format"):
        CaptionFile(tmp_path / "captions.txt")
    assert CaptionFile(tmp_path / "captions.txt", format="csv").format == "csv"


def test_glob_and_list_file_inputs(engine, tmp_path):
    images = tmp_path / "images"
    top, nested = draw_pictures(images, range(3)), draw_pictures(images / "more", [3])
    pattern = str(images / "**" / "*.png")
    assert find_images([pattern]) == sorted([*top, *nested])
    assert find_images([images, pattern]) == [*top, *nested]  # each image once
    with pytest.raises(FileNotFoundError, match="no file matches"):
        find_images([str(images / "*.jpg")])

    lists = tmp_path / "lists"
    lists.mkdir()
    absolute = images / "more" / "shape_03.png"
    todo = lists / "todo.txt"
    todo.write_text(f"# to caption\n../images/shape_01.png\n\n../images/missing.png\n{absolute}\n")
    paths = find_images([todo])
    assert paths == [lists / "../images/shape_01.png", lists / "../images/missing.png", absolute]

    out = tmp_path / "captions.jsonl"
    assert counts(caption_images(engine, paths, out)) == (2, 0, 1)
    rows = read_rows(out)
    assert rows[str(paths[1])]["error"].startswith("ImageFileError: ")
    expected = direct_captions(engine, [images / "shape_01.png", absolute])
    assert [rows[str(paths[0])]["caption"], rows[str(absolute)]["caption"]] == expected


def test_csv_output(engine, tmp_path):
    images = tmp_path / "images"
    scenes = draw_pictures(images, range(3))
    (images / "notes.png").write_text("not an image")
    by_suffix, by_format = tmp_path / "captions.csv", tmp_path / "captions.out"
    caption_images(engine, find_images([images]), by_suffix, batch_size=2)
    caption_images(engine, find_images([images]), by_format, format="csv")

    assert by_format.read_text() == by_suffix.read_text()
    assert by_suffix.read_text().startswith("path,caption,error\n")
    rows = read_rows(by_suffix)
    assert [rows[str(p)]["caption"] for p in scenes] == direct_captions(engine, scenes)
    assert all(rows[str(p)]["error"] == "" for p in scenes)
    notes = rows[str(images / "notes.png")]
    assert notes["caption"] == "" and notes["error"].startswith("NotAnImageError: ")


# ---- the command line --------------------------------------------------------------------------


def test_caption_command(engine, tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "captions.jsonl"
    scenes = draw_pictures(images, range(3))
    argv = ["caption", str(images), "-o", str(out), "--batch-size", "2", "--max-tokens", "3"]
    assert main([*argv, "--quiet"]) == 0
    assert "captioned 3 images, skipped 0 already done, 0 errors" in capsys.readouterr().out
    short = SamplingParams(temperature=0, max_tokens=3)  # the options reach the engine
    rows = read_rows(out)
    assert [rows[str(p)]["caption"] for p in scenes] == direct_captions(engine, scenes, short)

    assert main(argv) == 0
    assert "captioned 0 images, skipped 3 already done" in capsys.readouterr().out


def test_caption_command_with_a_json_schema_writes_the_parsed_scene(tmp_path, capsys):
    images, out = tmp_path / "images", tmp_path / "shapes.jsonl"
    scenes = draw_pictures(images, range(4))
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(demo_schema()))
    argv = ["caption", str(images), "-o", str(out), "--prompt", DEMO_JSON_PROMPT, "--quiet",
            "--json-schema", str(schema), "--max-tokens", str(DEMO_JSON_MAX_TOKENS)]  # fmt: skip
    assert main(argv) == 0
    assert "captioned 4 images, skipped 0 already done, 0 errors" in capsys.readouterr().out
    rows = read_rows(out)
    for path, scene in scenes.items():
        row = rows[str(path)]
        assert set(row) == {"path", "caption", "error", "parsed"} and row["error"] is None
        assert row["parsed"] == json.loads(row["caption"]) == json.loads(scene_json(scene))


def test_caption_command_choice_to_csv_and_cut_off_rows(tmp_path, capsys):
    images = tmp_path / "images"
    scenes = draw_pictures(images, range(3))
    out = tmp_path / "kinds.csv"
    choices = [arg for kind in KINDS for arg in ("--choice", kind)]
    argv = ["caption", str(images), "-o", str(out), "--quiet", *choices]
    assert main(argv) == 0
    with open(out, newline="") as f:
        assert next(csv.reader(f)) == ["path", "caption", "error", "parsed"]
    for row in read_rows(out).values():
        assert row["caption"] in KINDS and row["parsed"] == row["caption"] and not row["error"]
    assert main(argv) == 0  # a rerun resumes the same file
    assert "skipped 3 already done" in capsys.readouterr().out
    # Too few tokens for the JSON: the text is kept and the row says why it has no value.
    cut = tmp_path / "cut.jsonl"
    params = SamplingParams(temperature=0, max_tokens=4, structured_outputs={"json": demo_schema()})
    with Engine(default_model_path()) as engine:
        summary = caption_images(engine, list(scenes), cut, DEMO_JSON_PROMPT, params)
    assert summary.num_errors == 3
    for row in read_rows(cut).values():
        assert row["error"].startswith("IncompleteOutputError") and row["parsed"] is None
        assert row["caption"].startswith("{")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["-o", "c.jsonl", "--regex", "(unclosed"], "structured_outputs.regex"),
        (["-o", "c.jsonl", "--json-schema", "missing.json"], "--json-schema missing.json"),
        (["-o", "c.jsonl", "--regex", "a", "--choice", "b"], "not allowed with"),
        (["-o", "captions.txt"], "cannot tell the format"),
        (["-o", "c.jsonl", "--temperature", "-1"], "temperature"),
        (["-o", "c.jsonl", "--batch-size", "0"], "positive"),
        (["-o", "c.jsonl", "--model", "no/such/model"], "no/such/model"),
    ],
)
def test_caption_command_usage_errors(tmp_path, capsys, options, message):
    draw_pictures(tmp_path / "images", [0])
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(tmp_path / "images"), *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_caption_command_in_a_subprocess(tmp_path):
    scenes = draw_pictures(tmp_path / "images", range(2))
    out = tmp_path / "captions.csv"
    run = subprocess.run(
        [sys.executable, "-m", "vlm_engine.cli", "caption", str(tmp_path / "images" / "*.png")]
        + ["-o", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "captioned 2 images, skipped 0 already done, 0 errors" in run.stdout
    assert "img/s" in run.stderr  # the progress bar
    rows = read_rows(out)
    for path, scene in scenes.items():
        assert all(parse_caption(rows[str(path)]["caption"]).matches(scene).values())


def test_example_script(tmp_path, monkeypatch, capsys):
    draw_pictures(tmp_path / "images", range(2))
    out = tmp_path / "captions.jsonl"
    script = REPO / "examples" / "caption_images.py"
    monkeypatch.setattr(sys, "argv", [str(script), str(tmp_path / "images"), "-o", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    assert "captioned 2 images" in capsys.readouterr().out
    assert len(read_rows(out)) == 2


@pytest.mark.parametrize(
    ("command", "mentions"),
    [
        ([], ["caption", "demo", "generate", "examples:", "vlm-engine caption"]),
        (
            ["caption"],
            ["--output", "--format", "--batch-size", "--model", "--prompt", "--max-tokens"]
            + ["--temperature", "--top-p", "--top-k", "--seed", "--device", "--dtype"]
            + ["glob", "list file", "resume", "examples:"],
        ),
        (
            ["demo"],
            ["--model", "--host", "127.0.0.1", "this machine only", "--port", "7860"]
            + ["--device", "--dtype", "examples:"],
        ),
        (["generate"], ["images", "--model", "--prompt", "--max-tokens", "examples:"]),
    ],
)
def test_help_explains_each_command(monkeypatch, capsys, command, mentions):
    monkeypatch.setenv("COLUMNS", "200")  # no line breaks inside the phrases looked for
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    missing = [m for m in mentions if m not in text]
    assert not missing, text


class StopAfter:
    """A real engine whose `step` raises KeyboardInterrupt after `steps` steps (a user's Ctrl-C
    in the middle of a run)."""

    def __init__(self, engine: Engine, steps: int | None):
        self.engine, self.steps = engine, steps
        self.most_in_flight = 0  # requests queued and unfinished, seen at a step

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def step(self):
        if self.steps == 0:
            raise KeyboardInterrupt
        if self.steps is not None:
            self.steps -= 1
        in_flight = len(self.engine.output_processor.states)
        self.most_in_flight = max(self.most_in_flight, in_flight)
        return self.engine.step()


def test_rows_in_input_order_batches_overlap_and_an_interrupt_resumes(engine, tmp_path):
    scenes = draw_pictures(tmp_path / "images", range(30, 41))
    paths = list(scenes)
    varied = SamplingParams(temperature=1.0, seed=3, max_tokens=DEFAULT_MAX_TOKENS)
    out = tmp_path / "c.jsonl"
    with pytest.raises(KeyboardInterrupt):
        caption_images(StopAfter(engine, 14), paths, out, params=varied, batch_size=4)
    written = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert 0 < len(written) < len(paths) and written == [str(p) for p in paths[: len(written)]]
    assert not engine.has_unfinished()  # the interrupted requests were aborted
    assert engine.core.all_blocks_free()
    watched = StopAfter(engine, None)
    summary = caption_images(watched, paths, out, params=varied, batch_size=4)
    assert counts(summary) == (len(paths) - len(written), len(written), 0)
    assert watched.most_in_flight > 4  # the next batch joined before the last one drained
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["path"] for row in rows] == [str(p) for p in paths]  # input order, each once
    assert all(row["caption"] and row["error"] is None for row in rows)
