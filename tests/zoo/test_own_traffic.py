"""Your own traffic: `--trace` values (synthetic, file:, azure-functions:) fitted to a run, and
`--stream` values (csv:, images:, video:) read for a workload, with errors that name the line."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from apparate.zoo import trace_specs as TS
from apparate.zoo import traces as T
from apparate.zoo.own_streams import check_stream, resolve_stream, stream_key


def _functions_file(path: Path, rows: list[list[int]]) -> Path:
    m = len(rows[0])
    lines = ["HashOwner,HashApp,HashFunction,Trigger," + ",".join(str(i) for i in range(1, m + 1))]
    lines += [f"o{k},a{k},f{k},http," + ",".join(map(str, c)) for k, c in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=2, max_size=40), st.integers(1, 300))
def test_a_fitted_trace_is_the_file_cut_or_repeated_to_n(raw, n):
    times = np.sort(np.asarray(raw))
    if not times[-1] > times[0]:
        times[-1] = times[0] + 1.0
    fitted, note = TS.fit(T.Trace(times), n=n)
    own = times - times[0]
    assert fitted.size == n and fitted[0] == 0 and np.all(np.diff(fitted) >= 0)
    k = min(n, own.size)
    np.testing.assert_allclose(fitted[:k], own[:k])  # the file's own arrivals come first, unchanged
    if n > own.size:
        assert note.startswith("repeated")
        period = own[-1] + own[-1] / (own.size - 1)  # one mean gap between copies
        np.testing.assert_allclose(fitted[own.size:2 * own.size][: n - own.size], (own + period)[: n - own.size])
    else:
        assert note.startswith("cut") or note == "used whole"


def test_file_trace_keeps_its_rate_unless_told_and_says_what_it_did(tmp_path):
    path = T.write_csv([10.0, 10.5, 12.0, 13.0], tmp_path / "arrivals.csv")
    own = TS.make(f"file:{path}", n=8)
    assert "its own rate 1/s" in own.note and "repeated 2 times" in own.note
    np.testing.assert_allclose(own.times[:4], [0, 0.5, 2, 3])
    fast = TS.make(f"file:{path}", n=3, rate=10.0)
    assert "rescaled from 1/s to 10/s" in fast.note and "cut to its first 3 of 4" in fast.note
    np.testing.assert_allclose(fast.times, [0, 0.05, 0.2])
    spanned = TS.make(f"file:{path}", duration=2.5)
    assert spanned.times.tolist() == [0, 0.5, 2.0] and "cut to its first 2.5 s" in spanned.note


def test_azure_functions_trace_picks_a_function_by_row_or_hash(tmp_path):
    path = _functions_file(tmp_path / "inv.csv", [[3, 0, 5], [0, 2, 0]])
    assert TS.parse(f"azure-functions:{path}:1") == ("azure-functions", path, 1)
    assert TS.parse(f"azure-functions:{path}:f0") == ("azure-functions", path, "f0")
    assert TS.parse(f"azure-functions:{path}") == ("azure-functions", path, None)
    assert TS.make(f"azure-functions:{path}", n=8).times.size == 8
    second = TS.make(f"azure-functions:{path}:1", n=2)
    assert 60 <= second.times[1] + T.azure_functions(path, 1).times[0] < 120  # both in minute 2
    with pytest.raises(ValueError, match="no function"):
        TS.make(f"azure-functions:{path}:f9", n=2)


def test_bad_traces_are_refused_naming_the_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s\n0.0\n0.5\n0.2\n")
    with pytest.raises(ValueError, match=r"line 4: time 0.2 s is earlier"):
        TS.check(f"file:{bad}")
    with pytest.raises(ValueError, match="unknown trace 'poison'"):
        TS.check("poison")
    with pytest.raises(FileNotFoundError):
        TS.check(f"file:{tmp_path / 'none.csv'}")
    one = T.write_csv([1.0], tmp_path / "one.csv")
    with pytest.raises(ValueError, match="two arrivals"):
        TS.check(f"file:{one}")


def test_synthetic_traces_by_name_at_their_rate():
    assert TS.make("fixed", n=4, rate=10).times.tolist() == pytest.approx([0, 0.1, 0.2, 0.3])
    g = TS.make("gamma", n=2000, rate=50, cv=3.0)
    assert g.times.size == 2000 and 40 < T.mean_rate(g.times) < 60
    assert TS.make("poisson", n=5).rate == TS.DEFAULT_RATE


# ------------------------------------------------------------------------------------------ streams
def test_csv_stream_reads_texts_and_labels_for_a_text_workload(tmp_path, minilm_base):
    from apparate.zoo.workload import Workload

    model, enc = minilm_base
    wl = Workload(name="t", kind="text", model=model, encode=enc, num_classes=2, class_names=("negative", "positive"),
                  streams={}, bootstrap_stream="x", default_ramp="mean")
    path = tmp_path / "texts.csv"
    path.write_text('text,label\n"a fine, warm film",positive\nawful,0\nno label here,\n')
    s = resolve_stream(wl, f"csv:{path}")
    assert s.inputs == ["a fine, warm film", "awful", "no label here"] and s.labels.tolist() == [1, 0, -1]
    assert s.name == "csv:texts.csv" and s.costs[0] > s.costs[1]
    assert len(resolve_stream(wl, f"csv:{path}", n=2)) == 2
    path.write_text("text,label\nfine,1\nbad,1,extra\n")
    with pytest.raises(ValueError, match=r"texts.csv, line 3: 3 cells, the header has 2"):
        check_stream(f"csv:{path}")
    path.write_text("text,label\nfine,1\nbad,meh\n")
    with pytest.raises(ValueError, match=r"line 3: label 'meh' is not an integer"):
        check_stream(f"csv:{path}")
    path.write_text("text,label\nfine,7\n")
    with pytest.raises(ValueError, match="outside the model's 0..1"):
        resolve_stream(wl, f"csv:{path}")
    with pytest.raises(ValueError, match="need an image workload"):
        check_stream(f"images:{tmp_path}", "text")


def test_images_stream_matches_folders_to_the_models_classes(tmp_path, r20, test_images):
    root = tmp_path / "shots"
    for i in range(6):
        cls = r20.class_names[int(test_images.labels[i])]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(test_images.inputs[i])).save(root / cls / f"{i}.png")
    s = resolve_stream(r20, f"images:{root}")
    # the folders' class names are looked up among the model's, not numbered alphabetically
    assert sorted(s.labels.tolist()) == sorted(test_images.labels[:6].tolist())
    assert s.inputs.shape[1:] == (32, 32, 3) and s.name == "images:shots"
    key = stream_key(f"images:{root}")
    assert key.startswith("images-shots-") and stream_key(f"images:{root}") == key
    os.utime(next(root.rglob("*.png")), ns=(0, 1))  # an image changed: its recording is not reused
    assert stream_key(f"images:{root}") != key
    (root / "zebra").mkdir()
    Image.fromarray(np.asarray(test_images.inputs[0])).save(root / "zebra" / "z.png")
    with pytest.raises(ValueError, match="zebra are not among the model's classes"):
        resolve_stream(r20, f"images:{root}")
    manifest = tmp_path / "m.csv"
    first = next(root.rglob("*.png")).relative_to(tmp_path)
    manifest.write_text(f"path,label\n{first},cat\n{first},\n{first},11\n")
    with pytest.raises(ValueError, match=r"m.csv, line 4: label 11 is outside 0..9"):
        resolve_stream(r20, f"images:{manifest}")
    manifest.write_text(f"path,label\n{first},cat\n{first},\n")
    m = resolve_stream(r20, f"images:{manifest}")
    assert m.labels.tolist() == [r20.class_names.index("cat"), -1]
    manifest.write_text("path,label\n,1\n")
    with pytest.raises(ValueError, match="line 2: empty path"):
        check_stream(f"images:{manifest}")
