import numpy as np
import pytest

from apparate.zoo import streams
from apparate.zoo.text import read_rotten_tomatoes, read_sst2, read_table


def test_sst2_splits(data_dir):
    dev = read_sst2(data_dir, "dev")
    assert len(dev) == 872 and {d.label for d in dev} == {0, 1}
    assert dev[0].text == "one long string of cliches ."
    with pytest.raises(ValueError):
        read_sst2(data_dir, "test")


def test_rotten_tomatoes_snippets():
    rt = read_rotten_tomatoes()
    assert len(rt) == 12808
    assert sum(r.label for r in rt) == 7403  # fresh


def test_read_table_csv_and_tsv(tmp_path):
    (tmp_path / "a.csv").write_text('text,label\n"good, really",positive\nbad,0\nunknown,\n')
    rows = read_table(tmp_path / "a.csv")
    assert [(r.text, r.label) for r in rows] == [("good, really", 1), ("bad", 0), ("unknown", -1)]
    (tmp_path / "b.tsv").write_text("sentence\nfine\n")
    assert read_table(tmp_path / "b.tsv")[0].label == -1
    (tmp_path / "c.csv").write_text("words\nhello\n")
    with pytest.raises(ValueError, match="no text column"):
        read_table(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("text,label\nhello,maybe\n")
    with pytest.raises(ValueError, match="not an integer"):
        read_table(tmp_path / "d.csv")


def test_drifting_text_goes_short_long_short():
    short = [(f"w{i} x", i % 2) for i in range(50)]
    long = [(" ".join(["word"] * 30) + f" {i}", i % 2) for i in range(50)]
    s = streams.drifting_text(short, long, lambda t: np.array([len(x.split()) for x in t]), seed=1, n=30)
    assert len(s) == 30 and list(np.unique(s.meta["phase"])) == [0, 1, 2]
    mean = [s.costs[s.meta["phase"] == p].mean() for p in range(3)]
    assert mean[1] > mean[0] and mean[1] > mean[2]
    again = streams.drifting_text(short, long, lambda t: np.array([len(x.split()) for x in t]), seed=1, n=30)
    assert list(again.inputs) == list(s.inputs)
