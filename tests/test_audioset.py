"""The AudioSet-layout reader on hand-written files, as AudioSet ships them."""
from __future__ import annotations

import logging

import pytest

from slimvl.data.audioset import read_audioset, read_class_labels, read_segments

CLASSES = """index,mid,display_name
0,/m/09x0r,"Speech"
1,/m/05zppz,"Male speech, man speaking"
2,/t/dd00088,"Gush"
"""
SEGMENTS = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"
--ZhevVpy1s, 50.000, 60.000, "/m/05zppz"

-0CamVQdP_Y, 0.000, 6.000, "/m/09x0r"
"""


@pytest.fixture
def root(tmp_path):
    (tmp_path / "class_labels_indices.csv").write_text(CLASSES)
    (tmp_path / "eval_segments.csv").write_text(SEGMENTS)
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "--PJHxphWEs_30.000.mp4").write_bytes(b"x")  # the start time in the name
    (clips / "Y--ZhevVpy1s.wav").write_bytes(b"x")        # the "Y" prefix of the download scripts
    (clips / "-0CamVQdP_Y.mkv").write_bytes(b"x")         # the id alone
    return tmp_path


def test_reads_audioset_as_shipped(root):
    classes, records = read_audioset(root, "eval")
    assert [(c.index, c.mid, c.name) for c in classes] == [(0, "/m/09x0r", "Speech"),
                                                          (1, "/m/05zppz", "Male speech, man speaking"),
                                                          (2, "/t/dd00088", "Gush")]
    assert [(r.ytid, r.start, r.end, r.labels, r.line) for r in records] == [
        ("--PJHxphWEs", 30.0, 40.0, [0, 2], 4), ("--ZhevVpy1s", 50.0, 60.0, [1], 5), ("-0CamVQdP_Y", 0.0, 6.0, [0], 7)]
    assert [r.path.name for r in records] == ["--PJHxphWEs_30.000.mp4", "Y--ZhevVpy1s.wav", "-0CamVQdP_Y.mkv"]


def test_a_missing_clip_is_named_or_skipped_and_counted(root, caplog):
    (root / "clips" / "Y--ZhevVpy1s.wav").unlink()
    with pytest.raises(FileNotFoundError, match="line 5: no clip for --ZhevVpy1s.*1 of 3 clips missing"):
        read_audioset(root, "eval")
    with caplog.at_level(logging.INFO, logger="slimvl"):
        _, records = read_audioset(root, "eval", skip_missing=True)
    assert [r.ytid for r in records] == ["--PJHxphWEs", "-0CamVQdP_Y"]
    assert "1 of 3 clips missing" in caplog.text


@pytest.mark.parametrize("line,message", [
    ('abc, 1.0, 2.0, "/m/nope"', r"line 4 \(abc\): labels \['/m/nope'\] are not in the class list"),
    ("abc, one, 2.0, /m/09x0r", r"line 4: start/end 'one', '2.0' are not numbers"),
    ("abc, 1.0", r"line 4: expected YTID, start_seconds, end_seconds, positive_labels"),
    ('abc, 5.0, 2.0, "/m/09x0r"', r"line 4: needs a clip id and end_seconds > start_seconds"),
])
def test_bad_rows_are_named(tmp_path, line, message):
    (tmp_path / "s.csv").write_text("# a\n# b\n# YTID, start_seconds, end_seconds, positive_labels\n" + line + "\n")
    classes = read_class_labels_text(tmp_path, CLASSES)
    with pytest.raises(ValueError, match=message):
        read_segments(tmp_path / "s.csv", classes)


def read_class_labels_text(folder, text):
    (folder / "class_labels_indices.csv").write_text(text)
    return read_class_labels(folder / "class_labels_indices.csv")


def test_bad_class_lists_are_named(tmp_path):
    with pytest.raises(ValueError, match="header 'index,mid,display_name'"):
        read_class_labels_text(tmp_path, "id,mid,name\n0,/m/a,A\n")
    with pytest.raises(ValueError, match="indices must run 0..1"):
        read_class_labels_text(tmp_path, "index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n")
    with pytest.raises(ValueError, match=r"mids listed twice: \['/m/a'\]"):
        read_class_labels_text(tmp_path, "index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n")
    with pytest.raises(FileNotFoundError, match="class_labels_indices.csv"):
        read_audioset(tmp_path / "nowhere", "eval")
